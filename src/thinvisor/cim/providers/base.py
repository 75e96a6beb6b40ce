"""What every provider module shares: the host's path and instances built from classes.

The host is one ``TV_ComputerSystem`` in root/cimv2 named after its hostname; each VM
is a ``TV_ComputerSystem`` named by its UUID; the resource pools are ``TV_ResourcePool``
instances keyed by ``InstanceID``. ``make_instance`` builds an instance of a class from
the repository: every property of the class (NULL unless given), each value typed after
its declaration, and the path from the class's Key properties.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pywbem
from pywbem import CIMInstance, CIMInstanceName, CIMProperty

from thinvisor.cim.provider import CIMV2, CimContext
from thinvisor.cim.schema import ClassRepository

HOST_CLASS = "TV_ComputerSystem"
VM_CLASS = "TV_ComputerSystem"
POOL_CLASS = "TV_ResourcePool"
POOL_KINDS = ("processor", "memory", "disk", "network")


def host_name() -> str:
    """The host's name, as its ``TV_ComputerSystem`` is keyed."""
    return socket.gethostname()


def host_path(namespace: str = CIMV2) -> CIMInstanceName:
    """The path of the host's ``TV_ComputerSystem``."""
    keys = {"CreationClassName": HOST_CLASS, "Name": host_name()}
    return CIMInstanceName(HOST_CLASS, keys, namespace=namespace)


def host_system(repository: ClassRepository, namespace: str = CIMV2) -> CIMInstance:
    """The host's ``TV_ComputerSystem`` instance (DSP1004 Base Server, DSP1052).

    The provider of ``TV_ComputerSystem`` (one per class: the virtualization module,
    whose VMs have methods) lists this instance next to the VMs.
    """
    name = host_name()
    return make_instance(
        repository,
        HOST_CLASS,
        {
            "CreationClassName": HOST_CLASS,
            "Name": name,
            "NameFormat": "IP" if "." in name else "Other",
            "ElementName": name,
            "Caption": "thinvisor host",
            "Description": "A thinvisor hypervisor host",
            "EnabledState": 2,  # Enabled
            "RequestedState": 12,  # Not Applicable
            "EnabledDefault": 2,
            "HealthState": 5,  # OK
            "OperationalStatus": [2],  # OK
            "Dedicated": [0],  # Not Dedicated
        },
        namespace,
    )


def vm_path(uuid: str, namespace: str = CIMV2) -> CIMInstanceName:
    """The path of a VM's ``TV_ComputerSystem``: keyed by the VM's UUID."""
    keys = {"CreationClassName": VM_CLASS, "Name": str(uuid)}
    return CIMInstanceName(VM_CLASS, keys, namespace=namespace)


def pool_path(kind: str, namespace: str = CIMV2) -> CIMInstanceName:
    """The path of a ``TV_ResourcePool``: ``kind`` is one of ``POOL_KINDS``."""
    return CIMInstanceName(
        POOL_CLASS, {"InstanceID": f"thinvisor:pool:{kind}"}, namespace=namespace
    )


@dataclass(frozen=True)
class _PropertyShape:
    name: str
    type: str
    is_array: bool
    reference_class: str | None
    embedded_object: str | None
    key: bool


def _shapes(repository: ClassRepository, classname: str) -> tuple[str, list[_PropertyShape]]:
    """The class's exact name and its properties' declarations, cached per repository."""
    cache: dict[str, tuple[str, list[_PropertyShape]]] = _SHAPE_CACHE.setdefault(id(repository), {})
    found = cache.get(classname.lower())
    if found is None:
        cls = repository.get(classname)
        shapes = [
            _PropertyShape(
                p.name,
                p.type,
                bool(p.is_array),
                p.reference_class,
                p.embedded_object,
                _is_key(p),
            )
            for p in cls.properties.values()
        ]
        found = (cls.classname, shapes)
        cache[classname.lower()] = found
    return found


# Keyed by id(): a repository lives as long as the server, and there are few of them.
_SHAPE_CACHE: dict[int, dict[str, tuple[str, list[_PropertyShape]]]] = {}


def _is_key(prop: Any) -> bool:
    qualifier = prop.qualifiers.get("Key")
    return qualifier is not None and bool(qualifier.value)


def make_instance(
    repository: ClassRepository,
    classname: str,
    properties: Mapping[str, Any],
    namespace: str = CIMV2,
) -> CIMInstance:
    """An instance of ``classname`` with ``properties`` (names case-insensitive) and its path.

    A ``CreationClassName`` key that is not given is the class's name. Raises
    ``ValueError`` for a property the class does not declare or a missing key.
    """
    name, shapes = _shapes(repository, classname)
    given = {k.lower(): v for k, v in properties.items()}
    declared = {s.name.lower() for s in shapes}
    unknown = sorted(set(given) - declared)
    if unknown:
        raise ValueError(f"{name} has no properties {unknown}")
    if "creationclassname" in declared and given.get("creationclassname") is None:
        given["creationclassname"] = name
    inst = CIMInstance(name)
    keys: dict[str, Any] = {}
    for shape in shapes:
        prop = _property(shape, given.get(shape.name.lower()))
        inst.properties[shape.name] = prop
        if shape.key:
            if prop.value is None:
                raise ValueError(f"{name}: key {shape.name} is not given")
            keys[shape.name] = prop.value
    inst.path = CIMInstanceName(name, keys, namespace=namespace)
    return inst


def _property(shape: _PropertyShape, value: Any) -> CIMProperty:
    if value is not None and shape.type != "reference":
        if shape.is_array:
            value = [pywbem.cimvalue(v, shape.type) for v in value]
        else:
            value = pywbem.cimvalue(value, shape.type)
    return CIMProperty(
        shape.name,
        value,
        type=shape.type,
        is_array=shape.is_array,
        reference_class=shape.reference_class,
        embedded_object=shape.embedded_object,
    )


def make_association(
    repository: ClassRepository,
    classname: str,
    namespace: str = CIMV2,
    **references: CIMInstanceName,
) -> CIMInstance:
    """An association instance whose (key) references are ``references`` by role name."""
    return make_instance(repository, classname, references, namespace)


Build = Callable[[CimContext], Awaitable[list[CIMInstance]]]


@dataclass
class FunctionProvider:
    """An ``InstanceProvider`` whose instances come from one async function."""

    classname: str
    namespace: str
    build: Build

    async def instances(self, ctx: CimContext) -> list[CIMInstance]:
        return await self.build(ctx)
