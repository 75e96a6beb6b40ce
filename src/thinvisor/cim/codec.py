"""CIM-XML (DSP0200/DSP0201) requests in, responses out.

This is the only module that imports pywbem's private modules (``_tupleparse``,
``_cim_xml``): pywbem is pinned, and if those change, only this file does.

Requests are parsed with defusedxml before pywbem sees them: a DOCTYPE (and with it
every entity, internal or external) is refused, so nothing is ever expanded or
fetched. The tree defusedxml builds is handed to pywbem's tuple parser in the shape
its SAX handler would have produced.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import defusedxml  # type: ignore[import-untyped]
import defusedxml.ElementTree  # type: ignore[import-untyped]
import pywbem
from pywbem import (
    CIMClass,
    CIMClassName,
    CIMInstance,
    CIMInstanceName,
    CIMParameter,
    CIMQualifierDeclaration,
)
from pywbem import _cim_xml as cimxml  # private: see the module docstring
from pywbem._tupleparse import TupleParser  # private: see the module docstring

MAX_BODY_BYTES = 16 << 20
PROTOCOL_VERSION = "1.0"
CIM_VERSION = "2.0"
DTD_VERSION = "2.0"
_XML_DECLARATION = b'<?xml version="1.0" encoding="utf-8" ?>\n'


class RequestError(Exception):
    """A request refused at the HTTP level: ``status`` and DSP0200's ``CIMError`` header."""

    def __init__(self, status: int, cim_error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.cim_error = cim_error
        self.message = message


@dataclass(frozen=True)
class CimRequest:
    """One parsed operation.

    ``intrinsic`` operations (IMETHODCALL: GetClass, EnumerateInstances, ...) carry
    their IPARAMVALUEs in ``params``; extrinsic ones (METHODCALL) name their target
    (an instance path, or a class name for a static method) and carry their
    PARAMVALUEs, typed where the client gave a PARAMTYPE and as strings otherwise.
    """

    message_id: str
    intrinsic: bool
    operation: str
    namespace: str
    params: dict[str, Any] = field(default_factory=dict)
    target: CIMInstanceName | str | None = None


def parse_request(body: bytes) -> CimRequest:
    """The operation in a CIM-XML request body; ``RequestError`` if it is not one."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, "request-not-valid", f"the request exceeds {MAX_BODY_BYTES} bytes")
    root = _parse_xml(body)
    try:
        cim = TupleParser().parse_cim(_tupletree(root))
    except (pywbem.Error, ValueError, TypeError, KeyError, IndexError) as exc:
        raise RequestError(400, "request-not-valid", f"not a CIM-XML request: {exc}") from exc
    return _request(cim)


def _parse_xml(body: bytes) -> Element:
    try:
        root: Element = defusedxml.ElementTree.fromstring(
            body, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except defusedxml.DefusedXmlException as exc:
        # A DOCTYPE has no place in CIM-XML: refusing it refuses every entity attack.
        raise RequestError(400, "request-not-valid", f"refused: {exc}") from exc
    except (ParseError, ValueError) as exc:
        raise RequestError(400, "request-not-well-formed", f"malformed XML: {exc}") from exc
    return root


def _tupletree(elem: Element) -> tuple[str, dict[str, str], list[Any]]:
    """``elem`` as pywbem's SAX handler builds it: (name, attributes, children and text)."""
    children: list[Any] = [elem.text] if elem.text else []
    for child in elem:
        children.append(_tupletree(child))
        if child.tail:
            children.append(child.tail)
    return elem.tag, dict(elem.attrib), children


def _request(cim: Any) -> CimRequest:
    """The CimRequest in pywbem's parse of a CIM element."""
    _, _, message = cim
    _, message_attrs, simple = message
    message_id = message_attrs["ID"]
    if simple[0] != "SIMPLEREQ":
        raise RequestError(400, "request-not-valid", f"{simple[0]} is not a request")
    call = simple[2]
    if call[0] == "IMETHODCALL":
        _, attrs, namespace, iparams = call
        params = dict(iparams)
        if len(params) != len(iparams):
            raise RequestError(400, "request-not-valid", "an IPARAMVALUE is given twice")
        return CimRequest(message_id, True, attrs["NAME"], namespace, params)
    _, attrs, path, pvalues = call
    params = {name: _typed(value, ptype) for name, ptype, value in pvalues}
    target: CIMInstanceName | str = path if isinstance(path, CIMInstanceName) else path.classname
    return CimRequest(message_id, False, attrs["NAME"], path.namespace, params, target)


def _typed(value: Any, paramtype: str | None) -> Any:
    if paramtype is None or paramtype == "reference" or value is None:
        return value
    try:
        return pywbem.cimvalue(value, paramtype)
    except (ValueError, TypeError) as exc:
        raise RequestError(400, "request-not-valid", f"bad {paramtype} value: {exc}") from exc


# Responses


# An empty element written out in full: sblim's wbemcli cannot parse <PROPERTY .../>.
_EMPTY_ELEMENT = re.compile(r"<([A-Z][A-Z0-9._]*)((?:\s[^<>]*?)?)\s*/>")


def _document(payload: Any, message_id: str) -> bytes:
    message = cimxml.MESSAGE(cimxml.SIMPLERSP(payload), message_id, PROTOCOL_VERSION)
    doc = cimxml.CIM(message, CIM_VERSION, DTD_VERSION)
    text: str = _EMPTY_ELEMENT.sub(r"<\1\2></\1>", doc.toxml())
    return _XML_DECLARATION + text.encode("utf-8")


def error_response(request: CimRequest, code: int, description: str) -> bytes:
    """A response carrying an ERROR element for ``request``."""
    error = cimxml.ERROR(str(code), description)
    wrap = cimxml.IMETHODRESPONSE if request.intrinsic else cimxml.METHODRESPONSE
    return _document(wrap(request.operation, error), request.message_id)


def _with_host(path: CIMInstanceName, host: str, namespace: str) -> CIMInstanceName:
    path = path.copy()
    path.host = host
    path.namespace = path.namespace or namespace
    return path


def _instance_xml(inst: CIMInstance) -> Any:
    return inst.tocimxml(ignore_path=True)


def _named_instance(inst: CIMInstance, host: str, ns: str) -> Any:
    return cimxml.VALUE_NAMEDINSTANCE(
        inst.path.tocimxml(ignore_host=True, ignore_namespace=True), _instance_xml(inst)
    )


def _object_with_path(inst: CIMInstance, host: str, ns: str) -> Any:
    return cimxml.VALUE_OBJECTWITHPATH(
        _with_host(inst.path, host, ns).tocimxml(), _instance_xml(inst)
    )


def _object_path(path: CIMInstanceName, host: str, ns: str) -> Any:
    return cimxml.OBJECTPATH(_with_host(path, host, ns).tocimxml())


def _instance_name(path: CIMInstanceName, host: str, ns: str) -> Any:
    return path.tocimxml(ignore_host=True, ignore_namespace=True)


def _class(cls: CIMClass, host: str, ns: str) -> Any:
    return cls.tocimxml()


def _class_name(name: str | CIMClassName, host: str, ns: str) -> Any:
    classname = name.classname if isinstance(name, CIMClassName) else name
    return cimxml.CLASSNAME(classname)


def _qualifier(decl: CIMQualifierDeclaration, host: str, ns: str) -> Any:
    return decl.tocimxml()


def _instance(inst: CIMInstance, host: str, ns: str) -> Any:
    return _instance_xml(inst)


Encoder = Callable[[Any, str, str], Any]

# How each intrinsic operation's result is written into IRETURNVALUE (DSP0200 5.3.2).
_ENCODERS: dict[str, Encoder] = {
    "GetClass": _class,
    "EnumerateClasses": _class,
    "EnumerateClassNames": _class_name,
    "GetInstance": _instance,
    "EnumerateInstances": _named_instance,
    "EnumerateInstanceNames": _instance_name,
    "Associators": _object_with_path,
    "References": _object_with_path,
    "AssociatorNames": _object_path,
    "ReferenceNames": _object_path,
    "GetQualifier": _qualifier,
    "EnumerateQualifiers": _qualifier,
}

INTRINSIC_RESULTS = frozenset(_ENCODERS)


def imethod_response(request: CimRequest, result: Any, host: str) -> bytes:
    """The IMETHODRESPONSE for an intrinsic operation's ``result``: one object, a list, or
    None for a void operation. ``host`` goes into the full paths of association results."""
    encode = _ENCODERS[request.operation]
    items: Sequence[Any] = result if isinstance(result, list) else [result]
    if result is None:
        return _document(cimxml.IMETHODRESPONSE(request.operation), request.message_id)
    data = [encode(item, host, request.namespace) for item in items]
    returned = cimxml.IRETURNVALUE(data)
    return _document(cimxml.IMETHODRESPONSE(request.operation, returned), request.message_id)


def method_response(
    request: CimRequest,
    return_value: Any,
    return_type: str | None,
    out_params: Sequence[CIMParameter],
) -> bytes:
    """The METHODRESPONSE for an extrinsic method: its typed return value and out params."""
    data: list[Any] = []
    if return_value is not None:
        value = (
            cimxml.VALUE_REFERENCE(return_value.tocimxml())
            if isinstance(return_value, CIMInstanceName)
            else pywbem.tocimxml(return_value)
        )
        data.append(cimxml.RETURNVALUE(value, param_type=return_type))
    data.extend(param.tocimxml(as_value=True) for param in out_params)
    return _document(cimxml.METHODRESPONSE(request.operation, data), request.message_id)
