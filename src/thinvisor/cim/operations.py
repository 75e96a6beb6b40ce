"""The CIM operations (DSP0200), answered from the class repository and the providers.

Classes come from the ``ClassRepository`` and are visible in every namespace;
instances come from the providers registered for a class and its subclasses, in the
namespace the provider names. GetInstance, the filters and the association operations
are computed here over ``instances()``, which is fine at a host's scale.

Notes on DSP0200 choices:

- ``LocalOnly`` applies to class operations. For instance operations it is deprecated
  and ambiguous, and its default (true) would strip every inherited property from a
  ``TV_`` instance: like most WBEM servers, it is taken as false there.
- Association operations are answered for instances; on classes (an ObjectName that is
  a class name) they are CIM_ERR_NOT_SUPPORTED.
- The pull operations (Open*, Pull*, CloseEnumeration, EnumerationCount) are answered
  with exactly CIM_ERR_NOT_SUPPORTED: that is the one code on which pywbem's ``Iter*``
  functions fall back to the traditional operations.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pywbem
from pywbem import (
    CIM_ERR_ACCESS_DENIED,
    CIM_ERR_FAILED,
    CIM_ERR_INVALID_CLASS,
    CIM_ERR_INVALID_NAMESPACE,
    CIM_ERR_INVALID_PARAMETER,
    CIM_ERR_METHOD_NOT_AVAILABLE,
    CIM_ERR_METHOD_NOT_FOUND,
    CIM_ERR_NOT_FOUND,
    CIM_ERR_NOT_SUPPORTED,
    CIMClass,
    CIMClassName,
    CIMError,
    CIMInstance,
    CIMInstanceName,
    CIMMethod,
    CIMParameter,
)

from thinvisor.auth import Permission, allows
from thinvisor.cim.provider import (
    NAMESPACES,
    CimContext,
    InstanceProvider,
    MethodProvider,
    Registry,
    method_permission,
    normal_namespace,
    same_namespace,
)
from thinvisor.cim.schema import ClassRepository
from thinvisor.errors import ThinvisorError

log = logging.getLogger(__name__)

# Pull operations (DSP0200 5.3.2.x): refused so that clients fall back.
PULL_OPERATIONS = frozenset(
    {
        "OpenEnumerateInstances",
        "OpenEnumerateInstancePaths",
        "OpenAssociatorInstances",
        "OpenAssociatorInstancePaths",
        "OpenReferenceInstances",
        "OpenReferenceInstancePaths",
        "OpenQueryInstances",
        "PullInstancesWithPath",
        "PullInstancePaths",
        "PullInstances",
        "CloseEnumeration",
        "EnumerationCount",
    }
)

_CLASS_FLAGS = ("LocalOnly", "IncludeQualifiers", "IncludeClassOrigin")


@dataclass(frozen=True)
class MethodResult:
    """What an extrinsic method returned, typed after its definition."""

    return_value: Any
    return_type: str
    out_params: list[CIMParameter]


def cim_error(code: int, message: str) -> CIMError:
    return CIMError(code, message)


class Dispatcher:
    """Answers parsed CIM operations for one repository and one provider registry."""

    def __init__(
        self,
        repository: ClassRepository,
        registry: Registry,
        namespaces: Iterable[str] = NAMESPACES,
    ) -> None:
        self.repository = repository
        self.registry = registry
        self.namespaces = {normal_namespace(ns): ns for ns in namespaces}
        self._intrinsic: dict[str, Callable[[CimContext, Params], Awaitable[Any]]] = {
            "GetClass": self.get_class,
            "EnumerateClasses": self.enumerate_classes,
            "EnumerateClassNames": self.enumerate_class_names,
            "GetInstance": self.get_instance,
            "EnumerateInstances": self.enumerate_instances,
            "EnumerateInstanceNames": self.enumerate_instance_names,
            "Associators": self.associators,
            "AssociatorNames": self.associator_names,
            "References": self.references,
            "ReferenceNames": self.reference_names,
            "GetQualifier": self.get_qualifier,
            "EnumerateQualifiers": self.enumerate_qualifiers,
        }

    def namespace(self, namespace: str) -> str:
        """The canonical spelling of ``namespace``; CIM_ERR_INVALID_NAMESPACE if unknown."""
        try:
            return self.namespaces[normal_namespace(namespace)]
        except KeyError:
            raise cim_error(CIM_ERR_INVALID_NAMESPACE, f"no namespace {namespace!r}") from None

    async def intrinsic(self, ctx: CimContext, operation: str, params: dict[str, Any]) -> Any:
        """The result of intrinsic ``operation``: a CIM object, a list of them, or None."""
        handler = self._intrinsic.get(operation)
        if handler is None:
            raise cim_error(CIM_ERR_NOT_SUPPORTED, f"{operation} is not supported")
        self.namespace(ctx.namespace)
        _require(ctx, Permission.READ, operation)
        return await handler(ctx, Params(operation, params))

    # Classes

    async def get_class(self, ctx: CimContext, p: Params) -> CIMClass:
        p.only("ClassName", "PropertyList", *_CLASS_FLAGS)
        name = p.required_classname("ClassName")
        cls = self._class(name)
        return self._filter_class(cls, p, p.property_list())

    async def enumerate_classes(self, ctx: CimContext, p: Params) -> list[CIMClass]:
        p.only("ClassName", "DeepInheritance", *_CLASS_FLAGS)
        names = self._class_names(p)
        return [self._filter_class(self._class(n), p, None) for n in names]

    async def enumerate_class_names(self, ctx: CimContext, p: Params) -> list[str]:
        p.only("ClassName", "DeepInheritance")
        return self._class_names(p)

    def _class_names(self, p: Params) -> list[str]:
        name = p.classname("ClassName")
        if name is not None:
            name = self._class(name).classname
        return self.repository.subclasses(name, deep=p.flag("DeepInheritance", False))

    def _class(self, name: str) -> CIMClass:
        if name not in self.repository:
            raise cim_error(CIM_ERR_INVALID_CLASS, f"no class {name}")
        # Deep: the filters change qualifiers of methods' parameters, which copy() shares.
        return copy.deepcopy(self.repository.get(name))

    def _filter_class(self, cls: CIMClass, p: Params, props: set[str] | None) -> CIMClass:
        if p.flag("LocalOnly", True):
            cls.properties = {n: v for n, v in cls.properties.items() if not v.propagated}
            cls.methods = {n: m for n, m in cls.methods.items() if not m.propagated}
            cls.qualifiers = {n: q for n, q in cls.qualifiers.items() if not q.propagated}
        if props is not None:
            cls.properties = {n: v for n, v in cls.properties.items() if n.lower() in props}
        origins = self._origins(cls.classname) if p.flag("IncludeClassOrigin", False) else {}
        for item in [*cls.properties.values(), *cls.methods.values()]:
            item.class_origin = origins.get(item.name.lower())
        if not p.flag("IncludeQualifiers", True):
            _strip_qualifiers(cls)
        return cls

    def _origins(self, classname: str) -> dict[str, str]:
        """Where each property and method of ``classname`` is first defined."""
        origins: dict[str, str] = {}
        for name in [classname, *self.repository.superclasses(classname)]:
            cls = self.repository.get(name)
            for item in [*cls.properties, *cls.methods]:
                origins[item.lower()] = cls.classname  # the root-most class wins
        return origins

    async def get_qualifier(self, ctx: CimContext, p: Params) -> Any:
        p.only("QualifierName")
        wanted = p.string("QualifierName", required=True)
        for decl in self.repository.qualifier_declarations():
            if decl.name.lower() == (wanted or "").lower():
                return decl
        raise cim_error(CIM_ERR_NOT_FOUND, f"no qualifier {wanted}")

    async def enumerate_qualifiers(self, ctx: CimContext, p: Params) -> list[Any]:
        p.only()
        return self.repository.qualifier_declarations()

    # Instances

    async def get_instance(self, ctx: CimContext, p: Params) -> CIMInstance:
        p.only("InstanceName", "PropertyList", *_CLASS_FLAGS)
        path = p.instance_name("InstanceName")
        inst = await self.find_instance(ctx, path)
        return self._filter_instance(inst, p, self._class(path.classname))

    async def enumerate_instances(self, ctx: CimContext, p: Params) -> list[CIMInstance]:
        p.only("ClassName", "DeepInheritance", "PropertyList", *_CLASS_FLAGS)
        cls = self._class(p.required_classname("ClassName"))
        found = await self.instances_of(ctx, cls.classname, ctx.namespace)
        # DeepInheritance false: subclass instances, with the requested class's properties.
        deep = p.flag("DeepInheritance", True)
        view = None if deep else {n.lower() for n in cls.properties}
        return [self._filter_instance(i, p, cls, restrict=view) for i in found]

    async def enumerate_instance_names(self, ctx: CimContext, p: Params) -> list[CIMInstanceName]:
        p.only("ClassName")
        cls = self._class(p.required_classname("ClassName"))
        return [i.path for i in await self.instances_of(ctx, cls.classname, ctx.namespace)]

    async def instances_of(self, ctx: CimContext, classname: str, ns: str) -> list[CIMInstance]:
        """The instances of ``classname`` and its subclasses in namespace ``ns``."""
        family = {classname.lower()}
        family.update(n.lower() for n in self.repository.subclasses(classname, deep=True))
        return await self._instances_in(ctx, family, ns)

    async def _instances_in(self, ctx: CimContext, family: set[str], ns: str) -> list[CIMInstance]:
        """The instances of exactly the classes in ``family`` (lower case) in ``ns``."""
        found: list[CIMInstance] = []
        ctx = dataclasses.replace(ctx, namespace=ns)  # providers see their own namespace
        for provider in self.registry.providers(sorted(family), ns):
            for inst in await _provided(provider, ctx):
                if inst.classname.lower() in family:
                    found.append(inst)
        return found

    async def find_instance(self, ctx: CimContext, path: CIMInstanceName) -> CIMInstance:
        """The instance at ``path`` (in ``ctx``'s namespace unless it names one)."""
        self._class(path.classname)
        ns = self.namespace(path.namespace or ctx.namespace)
        for inst in await self.instances_of(ctx, path.classname, ns):
            if same_path(inst.path, path, ns):
                return inst
        raise cim_error(CIM_ERR_NOT_FOUND, f"no instance {path}")

    def _filter_instance(
        self,
        inst: CIMInstance,
        p: Params,
        requested: CIMClass,
        restrict: set[str] | None = None,
    ) -> CIMInstance:
        out = copy.deepcopy(inst)
        wanted = p.property_list()
        keep = [
            name
            for name in out.properties
            if (wanted is None or name.lower() in wanted)
            and (restrict is None or name.lower() in restrict)
        ]
        out.properties = {name: out.properties[name] for name in keep}
        origins = self._origins(inst.classname) if p.flag("IncludeClassOrigin", False) else {}
        for prop in out.properties.values():
            prop.class_origin = origins.get(prop.name.lower())
            if not p.flag("IncludeQualifiers", False):
                prop.qualifiers = {}
        if not p.flag("IncludeQualifiers", False):
            out.qualifiers = {}
        return out

    # Associations

    async def associators(self, ctx: CimContext, p: Params) -> list[CIMInstance]:
        p.only("ObjectName", "AssocClass", "ResultClass", "Role", "ResultRole", "PropertyList",
               "IncludeQualifiers", "IncludeClassOrigin")  # fmt: skip
        found: list[CIMInstance] = []
        for path in await self._associated_paths(ctx, p):
            try:
                inst = await self.find_instance(ctx, path)
            except CIMError:
                continue  # a dangling reference: the other end is gone
            full = self._filter_instance(inst, p, self._class(inst.classname))
            full.path = _with_namespace(inst.path, path.namespace or ctx.namespace)
            found.append(full)
        return found

    async def associator_names(self, ctx: CimContext, p: Params) -> list[CIMInstanceName]:
        p.only("ObjectName", "AssocClass", "ResultClass", "Role", "ResultRole")
        return await self._associated_paths(ctx, p)

    async def references(self, ctx: CimContext, p: Params) -> list[CIMInstance]:
        p.only("ObjectName", "ResultClass", "Role", "PropertyList", "IncludeQualifiers",
               "IncludeClassOrigin")  # fmt: skip
        found = await self._references(ctx, p, p.classname("ResultClass"))
        return [self._filter_instance(a, p, self._class(a.classname)) for a, _ in found]

    async def reference_names(self, ctx: CimContext, p: Params) -> list[CIMInstanceName]:
        p.only("ObjectName", "ResultClass", "Role")
        found = await self._references(ctx, p, p.classname("ResultClass"))
        return [a.path for a, _ in found]

    async def _associated_paths(self, ctx: CimContext, p: Params) -> list[CIMInstanceName]:
        result_class = self._optional_class(p.classname("ResultClass"))
        result_role = p.string("ResultRole")
        found: dict[str, CIMInstanceName] = {}
        for assoc, role in await self._references(ctx, p, p.classname("AssocClass")):
            for prop in assoc.properties.values():
                other = prop.value
                if prop.name.lower() == role or not isinstance(other, CIMInstanceName):
                    continue
                if result_role and prop.name.lower() != result_role.lower():
                    continue
                if result_class and not self._is_a(other.classname, result_class):
                    continue
                other = _with_namespace(other, other.namespace or ctx.namespace)
                found.setdefault(_path_key(other), other)
        return list(found.values())

    async def _references(
        self, ctx: CimContext, p: Params, assoc_class: str | None
    ) -> list[tuple[CIMInstance, str]]:
        """The association instances that refer to ObjectName, with the referring role."""
        target = p.object_name()
        assoc_class = self._optional_class(assoc_class)
        role = (p.string("Role") or "").lower()
        found: list[tuple[CIMInstance, str]] = []
        family = {n.lower() for n in self._association_classes(assoc_class)}
        for assoc in await self._instances_in(ctx, family, ctx.namespace):
            for prop in assoc.properties.values():
                value = prop.value
                if role and prop.name.lower() != role:
                    continue
                if isinstance(value, CIMInstanceName) and same_path(value, target, ctx.namespace):
                    found.append((_complete(assoc, ctx.namespace), prop.name.lower()))
                    break
        return found

    def _association_classes(self, assoc_class: str | None) -> list[str]:
        names = (
            [assoc_class, *self.repository.subclasses(assoc_class, deep=True)]
            if assoc_class
            else self.repository.names()
        )
        return [n for n in names if _is_association(self.repository.get(n))]

    def _optional_class(self, name: str | None) -> str | None:
        if name is None:
            return None
        if name not in self.repository:
            raise cim_error(CIM_ERR_INVALID_PARAMETER, f"no class {name}")
        return str(self.repository.get(name).classname)

    def _is_a(self, classname: str, ancestor: str) -> bool:
        if classname not in self.repository:
            return False
        chain = [classname, *self.repository.superclasses(classname)]
        return ancestor.lower() in (c.lower() for c in chain)

    # Extrinsic methods

    async def invoke(
        self,
        ctx: CimContext,
        target: CIMInstanceName | str,
        method: str,
        params: dict[str, Any],
    ) -> MethodResult:
        """Invoke ``method`` on ``target`` (an instance path or a class name)."""
        self.namespace(ctx.namespace)
        classname = target.classname if isinstance(target, CIMInstanceName) else target
        cls = self._class(classname)
        definition = _method(cls, method)
        provider = self.registry.get(cls.classname)
        _require(ctx, Permission.READ, method)
        if provider is None or not isinstance(provider, MethodProvider):
            raise cim_error(
                CIM_ERR_METHOD_NOT_AVAILABLE, f"{cls.classname}.{method} is not available"
            )
        _require(ctx, method_permission(provider, definition.name), definition.name)
        typed = _in_params(definition, params)
        if isinstance(target, CIMInstanceName):
            target = (await self.find_instance(ctx, target)).path
        try:
            value, out = await provider.invoke(ctx, target, definition.name, typed)
        except ThinvisorError as exc:
            raise cim_error(exc.cim_status, str(exc)) from exc
        return _method_result(definition, value, out)


def _require(ctx: CimContext, permission: Permission, what: str) -> None:
    if not allows(ctx.user.role, permission):
        raise cim_error(
            CIM_ERR_ACCESS_DENIED, f"role {ctx.user.role} may not {what} ({permission.value})"
        )


async def _provided(provider: InstanceProvider, ctx: CimContext) -> list[CIMInstance]:
    try:
        return await provider.instances(ctx)
    except CIMError:
        raise
    except ThinvisorError as exc:
        raise cim_error(exc.cim_status, str(exc)) from exc


def _method(cls: CIMClass, name: str) -> CIMMethod:
    for method in cls.methods.values():
        if method.name.lower() == name.lower():
            return method
    raise cim_error(CIM_ERR_METHOD_NOT_FOUND, f"{cls.classname} has no method {name}")


def _qualifier(item: Any, name: str, default: bool) -> bool:
    qual = item.qualifiers.get(name)
    if qual is None or qual.value is None:
        return default
    return bool(qual.value)


def _in_params(method: CIMMethod, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` by the names the method declares, typed after the declaration."""
    declared = {p.name.lower(): p for p in method.parameters.values() if _qualifier(p, "IN", True)}
    typed: dict[str, Any] = {}
    for name, value in params.items():
        param = declared.get(name.lower())
        if param is None:
            raise cim_error(CIM_ERR_INVALID_PARAMETER, f"{method.name} has no in parameter {name}")
        typed[param.name] = _typed_value(param, value)
    return typed


def _typed_value(param: CIMParameter, value: Any) -> Any:
    if value is None:
        return None
    if param.type == "reference":
        ok = all(isinstance(v, CIMInstanceName) for v in (value if param.is_array else [value]))
        if not ok:
            raise cim_error(CIM_ERR_INVALID_PARAMETER, f"{param.name} must be a reference")
        return value
    if param.is_array != isinstance(value, list):
        raise cim_error(CIM_ERR_INVALID_PARAMETER, f"{param.name}: array mismatch")
    try:
        return pywbem.cimvalue(value, param.type)
    except (ValueError, TypeError) as exc:
        raise cim_error(CIM_ERR_INVALID_PARAMETER, f"{param.name}: {exc}") from exc


def _method_result(method: CIMMethod, value: Any, out: dict[str, Any]) -> MethodResult:
    declared = {p.name.lower(): p for p in method.parameters.values()}
    params: list[CIMParameter] = []
    for name, raw in out.items():
        param = declared.get(name.lower())
        if param is None or not _qualifier(param, "OUT", False):
            raise cim_error(CIM_ERR_FAILED, f"{method.name} returned an unknown out parameter")
        params.append(
            CIMParameter(
                param.name,
                param.type,
                value=raw,
                is_array=param.is_array,
                reference_class=param.reference_class,
            )
        )
    try:
        returned = None if value is None else pywbem.cimvalue(value, method.return_type)
    except (ValueError, TypeError) as exc:
        raise cim_error(CIM_ERR_FAILED, f"{method.name} returned a bad value: {exc}") from exc
    return MethodResult(returned, method.return_type, params)


def _strip_qualifiers(cls: CIMClass) -> None:
    cls.qualifiers = {}
    for prop in cls.properties.values():
        prop.qualifiers = {}
    for method in cls.methods.values():
        method.qualifiers = {}
        for param in method.parameters.values():
            param.qualifiers = {}


def _is_association(cls: CIMClass) -> bool:
    return _qualifier(cls, "Association", False)


def _with_namespace(path: CIMInstanceName, namespace: str) -> CIMInstanceName:
    path = path.copy()
    path.namespace = namespace
    path.host = None
    return path


def _complete(inst: CIMInstance, namespace: str) -> CIMInstance:
    out = inst.copy()
    out.path = _with_namespace(inst.path, inst.path.namespace or namespace)
    return out


def _path_key(path: CIMInstanceName) -> str:
    keys = sorted((k.lower(), repr(v)) for k, v in path.keybindings.items())
    return f"{normal_namespace(path.namespace or '')}:{path.classname.lower()}:{keys}"


def same_path(a: CIMInstanceName, b: CIMInstanceName, default_namespace: str) -> bool:
    """Whether two instance paths name the same instance (hosts are ignored; a path
    without a namespace is in ``default_namespace``)."""
    if a.classname.lower() != b.classname.lower():
        return False
    if not same_namespace(a.namespace or default_namespace, b.namespace or default_namespace):
        return False
    ak = {k.lower(): v for k, v in a.keybindings.items()}
    bk = {k.lower(): v for k, v in b.keybindings.items()}
    if ak.keys() != bk.keys():
        return False
    return all(_same_key(ak[k], bk[k], default_namespace) for k in ak)


def _same_key(a: Any, b: Any, default_namespace: str) -> bool:
    if isinstance(a, CIMInstanceName) and isinstance(b, CIMInstanceName):
        return same_path(a, b, default_namespace)
    if isinstance(a, bool | int | float) and isinstance(b, bool | int | float):
        return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)
    return str(a) == str(b)


class Params:
    """An intrinsic operation's parameters, checked and read by name (case-insensitive)."""

    def __init__(self, operation: str, params: dict[str, Any]) -> None:
        self.operation = operation
        self._params = {name.lower(): (name, value) for name, value in params.items()}

    def only(self, *allowed: str) -> None:
        """CIM_ERR_INVALID_PARAMETER for any parameter but ``allowed``."""
        known = {a.lower() for a in allowed}
        extra = [name for key, (name, _) in self._params.items() if key not in known]
        if extra:
            raise self._invalid(f"unknown parameter {extra[0]}")

    def get(self, name: str) -> Any:
        return self._params.get(name.lower(), (name, None))[1]

    def flag(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._invalid(f"{name} must be TRUE or FALSE")
        return value

    def string(self, name: str, required: bool = False) -> str | None:
        value = self.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise self._invalid(f"{name} must be a string")
        return str(value)

    def classname(self, name: str) -> str | None:
        value = self.get(name)
        return None if value is None else self.required_classname(name)

    def required_classname(self, name: str) -> str:
        value = self.get(name)
        if not isinstance(value, CIMClassName):
            raise self._invalid(f"{name} must be a class name")
        return str(value.classname)

    def instance_name(self, name: str) -> CIMInstanceName:
        value = self.get(name)
        if not isinstance(value, CIMInstanceName):
            raise self._invalid(f"{name} must be an instance name")
        return value

    def object_name(self) -> CIMInstanceName:
        value = self.get("ObjectName")
        if isinstance(value, CIMClassName):
            raise cim_error(CIM_ERR_NOT_SUPPORTED, f"{self.operation} on a class is not supported")
        return self.instance_name("ObjectName")

    def property_list(self) -> set[str] | None:
        value = self.get("PropertyList")
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._invalid("PropertyList must be an array of strings")
        return {v.lower() for v in value}

    def _invalid(self, message: str) -> CIMError:
        return cim_error(CIM_ERR_INVALID_PARAMETER, f"{self.operation}: {message}")
