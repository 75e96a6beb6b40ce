"""The CIM classes thinvisor implements, one module per group of profiles."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pywbem import CIMInstance, CIMInstanceName

from thinvisor.auth import Permission
from thinvisor.cim.provider import (
    CimContext,
    InstanceProvider,
    MethodProvider,
    Registry,
    same_namespace,
)


def default_registry() -> Registry:
    """Every provider of the host's CIM server."""
    from thinvisor.cim.providers import (
        hardware,
        interop,
        logs,
        metrics,
        network,
        snapshots,
        virtualization,
    )

    found = [
        *interop.providers(extra=[*network.profiles(), *snapshots.profiles(), *metrics.profiles()]),
        *hardware.providers(),
        *logs.providers(),
        *virtualization.providers(),
        *network.providers(),
        *snapshots.providers(),
        *metrics.providers(),
    ]
    extensions = [*network.extensions(), *snapshots.extensions(), *metrics.extensions()]
    return Registry(extended(found, extensions))


def extended(
    providers: Iterable[InstanceProvider], extensions: Iterable[InstanceProvider]
) -> list[InstanceProvider]:
    """``providers``, each joined with the ``extensions`` of its class.

    One provider answers for a class, but a class can hold what different modules know:
    the host's processors and a switch's ports are both ``TV_SystemDevice``, VMs and
    switches both ``TV_ComputerSystem``. The module that owns the class provides it;
    others extend it with more instances. Methods stay the owner's: it answers them for
    every instance of its class.
    """
    found = {p.classname.lower(): p for p in providers}
    for extension in extensions:
        base = found.get(extension.classname.lower())
        if base is None or not same_namespace(base.namespace, extension.namespace):
            raise ValueError(f"no provider of {extension.classname} to extend")
        if isinstance(base, _Joined):
            base.parts.append(extension)
        elif isinstance(base, MethodProvider):
            found[extension.classname.lower()] = _JoinedWithMethods(
                base.classname, base.namespace, [base, extension], base
            )
        else:
            found[extension.classname.lower()] = _Joined(
                base.classname, base.namespace, [base, extension]
            )
    return list(found.values())


@dataclass
class _Joined:
    """The instances of several providers of one class."""

    classname: str
    namespace: str
    parts: list[InstanceProvider]

    async def instances(self, ctx: CimContext) -> list[CIMInstance]:
        return [inst for part in self.parts for inst in await part.instances(ctx)]


@dataclass
class _JoinedWithMethods(_Joined):
    """A class with methods, joined: its owner invokes them."""

    owner: MethodProvider

    @property
    def method_permissions(self) -> Mapping[str, Permission]:
        declared: Mapping[str, Permission] = getattr(self.owner, "method_permissions", {})
        return declared

    async def invoke(
        self,
        ctx: CimContext,
        target: CIMInstanceName | str,
        method: str,
        params: dict[str, Any],
    ) -> tuple[Any, dict[str, Any]]:
        return await self.owner.invoke(ctx, target, method, params)


__all__ = ["default_registry", "extended"]
