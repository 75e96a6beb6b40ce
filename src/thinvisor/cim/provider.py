"""The provider interface: what one CIM class needs to supply, and the registry of them.

A provider is small: it names its ``TV_`` class and the namespace its instances live
in, and lists its instances, complete and with their paths. Filtering, GetInstance,
associations and the class hierarchy are the dispatcher's work
(``thinvisor.cim.operations``). A provider whose class has methods also implements
``invoke``. Association classes are ordinary providers whose instances carry the
references.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pywbem import CIMInstance, CIMInstanceName

from thinvisor.auth import Permission, User
from thinvisor.cim.schema import ClassRepository
from thinvisor.errors import AlreadyExists

if TYPE_CHECKING:
    from thinvisor.host.agent import HostAgent

INTEROP = "root/interop"
CIMV2 = "root/cimv2"
NAMESPACES = (INTEROP, CIMV2)


@dataclass(frozen=True)
class CimContext:
    """Who asks, in which namespace, against which classes and which agent (None in tests
    of providers that need no agent)."""

    agent: HostAgent | None
    user: User
    repository: ClassRepository
    namespace: str


class InstanceProvider(Protocol):
    """The instances of one class.

    ``instances`` returns complete instances of ``classname`` with ``.path`` set: the
    key bindings and ``namespace``.
    """

    classname: str
    namespace: str

    async def instances(self, ctx: CimContext) -> list[CIMInstance]: ...


@runtime_checkable
class MethodProvider(Protocol):
    """A provider whose class has extrinsic methods.

    ``invoke`` gets the method name as the class spells it, the target (an instance path
    that exists, or the class name for a static method) and the in parameters typed
    after the method's definition; it returns the return value and the out parameters.
    Errors are ``thinvisor.errors`` types (or ``pywbem.CIMError``).

    ``method_permissions`` may name the permission of a method; otherwise
    ``method_permission`` decides.
    """

    classname: str
    namespace: str

    async def instances(self, ctx: CimContext) -> list[CIMInstance]: ...

    async def invoke(
        self,
        ctx: CimContext,
        target: CIMInstanceName | str,
        method: str,
        params: dict[str, Any],
    ) -> tuple[Any, dict[str, Any]]: ...


# Methods that change power state; every other method is taken to change configuration.
_POWER_METHODS = frozenset({"requeststatechange", "setpowerstate"})


def method_permission(provider: InstanceProvider, method: str) -> Permission:
    """The permission a user needs to invoke ``method`` on ``provider``'s class."""
    declared: Mapping[str, Permission] = getattr(provider, "method_permissions", {})
    for name, permission in declared.items():
        if name.lower() == method.lower():
            return permission
    return Permission.POWER if method.lower() in _POWER_METHODS else Permission.CONFIGURE


class Registry:
    """Providers by class name (case-insensitive): one provider per class."""

    def __init__(self, providers: Iterable[InstanceProvider] = ()) -> None:
        self._providers: dict[str, InstanceProvider] = {}
        for provider in providers:
            self.register(provider)

    def register(self, provider: InstanceProvider) -> None:
        key = provider.classname.lower()
        if key in self._providers:
            raise AlreadyExists(f"a provider for {provider.classname} is registered")
        self._providers[key] = provider

    def get(self, classname: str) -> InstanceProvider | None:
        return self._providers.get(classname.lower())

    def providers(self, classnames: Iterable[str], namespace: str) -> list[InstanceProvider]:
        """The providers of ``classnames`` whose instances live in ``namespace``."""
        found = (self._providers.get(name.lower()) for name in classnames)
        return [p for p in found if p is not None and same_namespace(p.namespace, namespace)]

    def __iter__(self) -> Iterator[InstanceProvider]:
        return iter(list(self._providers.values()))

    def __len__(self) -> int:
        return len(self._providers)


def normal_namespace(namespace: str) -> str:
    """``namespace`` without surrounding slashes, lower case, for comparison."""
    return namespace.strip("/").lower()


def same_namespace(a: str | None, b: str | None) -> bool:
    return normal_namespace(a or "") == normal_namespace(b or "")
