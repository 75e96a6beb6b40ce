"""The CIM-XML server's HTTP side (DSP0200): ``POST /cimom``, HTTP Basic auth.

A small ASGI app: it checks the CIM headers, authenticates against the agent's users
with the agent's login throttle, reads a bounded body, and hands the request to the
codec and the dispatcher. Errors before an operation is known are HTTP errors with a
``CIMError`` header; errors of an operation are ERROR elements in a 200 response.
"""

from __future__ import annotations

import base64
import binascii
import logging
import urllib.parse

from pywbem import CIM_ERR_FAILED, CIMError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from thinvisor.auth import User
from thinvisor.cim import codec
from thinvisor.cim.codec import CimRequest, RequestError
from thinvisor.cim.operations import Dispatcher
from thinvisor.cim.provider import CimContext, Registry, same_namespace
from thinvisor.cim.schema import ClassRepository
from thinvisor.errors import ThinvisorError, TooManyAttempts, Unauthenticated
from thinvisor.host.agent import HostAgent

log = logging.getLogger(__name__)

CIM_PATH = "/cimom"
CONTENT_TYPE = "application/xml; charset=utf-8"
_CHALLENGE = {"WWW-Authenticate": 'Basic realm="thinvisor"'}


class _Refused(Exception):
    """An HTTP-level refusal: status, headers and a short text body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def response(self) -> Response:
        return Response(self.message + "\n", self.status, self.headers, "text/plain")


def create_cim_app(
    agent: HostAgent,
    repository: ClassRepository,
    registry: Registry,
    *,
    max_body_bytes: int = codec.MAX_BODY_BYTES,
) -> Starlette:
    """The CIM server as an ASGI app: ``POST /cimom``."""
    dispatcher = Dispatcher(repository, registry)

    async def cimom(request: Request) -> Response:
        try:
            _check_operation_header(request)
            user = await _authenticate(agent, request)
            cim_request = codec.parse_request(await _read_body(request, max_body_bytes))
            _check_headers(request, cim_request)
        except _Refused as exc:
            return exc.response()
        except RequestError as exc:
            return _Refused(exc.status, exc.message, {"CIMError": exc.cim_error}).response()
        payload = await _answer(dispatcher, agent, user, repository, cim_request, _host(request))
        return Response(payload, 200, {"CIMOperation": "MethodResponse"}, CONTENT_TYPE)

    return Starlette(routes=[Route(CIM_PATH, cimom, methods=["POST"])])


async def _answer(
    dispatcher: Dispatcher,
    agent: HostAgent,
    user: User,
    repository: ClassRepository,
    request: CimRequest,
    host: str,
) -> bytes:
    try:
        ctx = CimContext(agent, user, repository, dispatcher.namespace(request.namespace))
        if request.intrinsic:
            result = await dispatcher.intrinsic(ctx, request.operation, request.params)
            return codec.imethod_response(request, result, host)
        assert request.target is not None  # the codec sets it for every METHODCALL
        done = await dispatcher.invoke(ctx, request.target, request.operation, request.params)
        return codec.method_response(request, done.return_value, done.return_type, done.out_params)
    except CIMError as exc:
        return codec.error_response(request, exc.status_code, exc.status_description)
    except ThinvisorError as exc:
        return codec.error_response(request, exc.cim_status, str(exc))
    except Exception:
        log.exception("CIM operation %s failed", request.operation)
        return codec.error_response(request, CIM_ERR_FAILED, "internal error")


def _check_operation_header(request: Request) -> None:
    if request.headers.get("CIMOperation", "").lower() != "methodcall":
        raise _Refused(
            400, "CIMOperation: MethodCall is required", {"CIMError": "unsupported-operation"}
        )


def _check_headers(request: Request, cim_request: CimRequest) -> None:
    """DSP0200: the CIMMethod and CIMObject headers must say what the body says."""
    method = urllib.parse.unquote(request.headers.get("CIMMethod", ""))
    ok = method.lower() == cim_request.operation.lower()
    if ok and cim_request.intrinsic:
        cim_object = urllib.parse.unquote(request.headers.get("CIMObject", ""))
        ok = same_namespace(cim_object, cim_request.namespace)
    if not ok:
        raise _Refused(
            400, "CIMMethod or CIMObject does not match the body", {"CIMError": "header-mismatch"}
        )


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(413, "request-not-valid", f"the request exceeds {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, "request-not-valid", f"the request exceeds {limit} bytes")
    return bytes(body)


def _host(request: Request) -> str:
    return request.headers.get("host") or request.url.hostname or "localhost"


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _authenticate(agent: HostAgent, request: Request) -> User:
    """The user behind HTTP Basic credentials, throttled per client address as the REST
    API does; failed logins are recorded as ``auth.login_failed`` events."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        raise _Refused(401, "authentication required", _CHALLENGE)
    try:
        name, sep, password = base64.b64decode(credentials).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise _Refused(401, "malformed Basic credentials", _CHALLENGE) from None
    if not sep:
        raise _Refused(401, "malformed Basic credentials", _CHALLENGE)
    try:
        return await agent.check_password(_client(request), name, password, "cim")
    except TooManyAttempts as exc:
        raise _Refused(429, str(exc), {"Retry-After": str(int(exc.retry_after) + 1)}) from None
    except Unauthenticated as exc:
        raise _Refused(401, str(exc), _CHALLENGE) from None
