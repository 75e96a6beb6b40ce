"""Who is asking, and may they: HTTP Basic or a bearer token on every route but health.

Failed logins are slowed down per client address and recorded as events. The host agent
and the center both serve these routes: all they need of their agent is ``AuthAgent``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Annotated, Protocol

from fastapi import APIRouter, Depends, HTTPException, Request, WebSocket
from pydantic import BaseModel

from thinvisor.api.errors import ERROR_RESPONSES, error_response
from thinvisor.auth import Permission, User, UserStore, allows
from thinvisor.errors import TooManyAttempts, Unauthenticated
from thinvisor.host.agent import HostAgent
from thinvisor.host.context import current_user
from thinvisor.host.events import EventLog
from thinvisor.model.base import StrictModel

router = APIRouter(prefix="/auth", tags=["auth"], responses=ERROR_RESPONSES)

_CHALLENGE = {"WWW-Authenticate": 'Basic realm="thinvisor", Bearer'}


class AuthAgent(Protocol):
    """What authentication needs of an agent (the host agent's, or the center's)."""

    users: UserStore
    events: EventLog

    async def check_password(self, address: str, name: str, password: str, via: str) -> User:
        """A user by password: ``TooManyAttempts`` or ``Unauthenticated`` otherwise."""
        ...


def agent_of(conn: Request | WebSocket) -> HostAgent:
    agent: HostAgent = conn.app.state.agent
    return agent


def auth_agent_of(conn: Request | WebSocket) -> AuthAgent:
    """The app's agent, whichever kind, as far as authentication goes."""
    agent: AuthAgent = conn.app.state.agent
    return agent


def _client(conn: Request | WebSocket) -> str:
    return conn.client.host if conn.client else "unknown"


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers=_CHALLENGE)


async def check_password(agent: AuthAgent, address: str, name: str, password: str) -> User:
    """A user by password through the agent's one throttled check, as HTTP errors."""
    try:
        return await agent.check_password(address, name, password, "api")
    except TooManyAttempts as exc:
        retry = {"Retry-After": str(int(exc.retry_after) + 1)}
        raise HTTPException(429, str(exc), headers=retry) from None
    except Unauthenticated as exc:
        raise _unauthorized(str(exc)) from None


async def authenticate(conn: Request | WebSocket) -> User:
    """The user behind a request: ``Authorization: Bearer``/``Basic``, or ``?token=``."""
    agent = auth_agent_of(conn)
    header = conn.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    token = conn.query_params.get("token") if not header else None
    if scheme.lower() == "bearer":
        token = credentials.strip()
    if token:
        user = agent.users.user_for_token(token)
        if user is None:
            raise _unauthorized("the token is not valid")
        return user
    if scheme.lower() == "basic":
        try:
            name, sep, password = base64.b64decode(credentials).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise _unauthorized("malformed Basic credentials") from None
        if not sep:
            raise _unauthorized("malformed Basic credentials")
        return await check_password(agent, _client(conn), name, password)
    raise _unauthorized("authentication required")


def require(permission: Permission) -> Callable[[Request], Awaitable[User]]:
    """A dependency: the authenticated user, if their role allows ``permission``."""

    async def dependency(request: Request) -> User:
        user = await authenticate(request)
        if not allows(user.role, permission):
            raise HTTPException(403, f"role {user.role} may not {permission.value}")
        current_user.set(user.name)
        return user

    return dependency


async def authenticated(request: Request) -> User:
    """A dependency: the authenticated user, whatever their role (for routes that check
    permissions on the object they act on)."""
    user = await authenticate(request)
    current_user.set(user.name)
    return user


async def authenticate_ws(websocket: WebSocket) -> User | None:
    """For WebSockets: the user, or None after refusing the handshake (401)."""
    try:
        user = await authenticate(websocket)
    except HTTPException as exc:
        await refuse_ws(websocket, exc.status_code, str(exc.detail))
        return None
    current_user.set(user.name)
    return user


async def require_ws(websocket: WebSocket, permission: Permission) -> User | None:
    """For WebSockets: the user, or None after refusing the handshake (401 or 403 with an
    error body where the server can answer HTTP, else closing with policy violation)."""
    user = await authenticate_ws(websocket)
    if user is None:
        return None
    if not allows(user.role, permission):
        await refuse_ws(websocket, 403, f"role {user.role} may not {permission.value}")
        return None
    return user


async def refuse_ws(websocket: WebSocket, status: int, message: str) -> None:
    """Refuse a WebSocket handshake: an HTTP error answer where the server can give one."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        code = "unauthorized" if status == 401 else "forbidden"
        await websocket.send_denial_response(error_response(status, code, message))
    else:
        await websocket.close(code=1008, reason=message)


class Login(StrictModel):
    user: str
    password: str
    label: str | None = None


class LoginResult(BaseModel):
    token: str
    user: str
    role: str


class WhoAmI(BaseModel):
    user: str
    role: str


@router.post("/login", response_model=LoginResult)
async def login(body: Login, request: Request) -> LoginResult:
    """Trade a user name and password for an API token."""
    agent = auth_agent_of(request)
    address = _client(request)
    user = await check_password(agent, address, body.user, body.password)
    _, token = agent.users.create_token(user.name, body.label or f"login from {address}")
    agent.events.emit(
        "auth.login",
        f"{user.name} logged in from {address}",
        object=f"user/{user.name}",
        user=user.name,
        data={"address": address},
    )
    return LoginResult(token=token, user=user.name, role=user.role.value)


@router.get("/whoami", response_model=WhoAmI)
async def whoami(user: Annotated[User, Depends(authenticated)]) -> WhoAmI:
    """Who the credentials belong to, and their role (any role may ask, no-access too)."""
    return WhoAmI(user=user.name, role=user.role.value)
