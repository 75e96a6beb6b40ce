"""The center's drivers for managed hosts, one module per kind (``base`` is the interface).

Provider modules import their peer's library (libvirt, pyVmomi) only when used:
``provider_class(kind)`` imports the module of one kind.
"""

from __future__ import annotations

import importlib

from thinvisor.errors import InvalidArgument
from thinvisor.providers.base import Connection, Provider

#: Every provider kind, with the module that holds its ``Provider`` class.
KINDS: dict[str, str] = {
    "thinvisor": "thinvisor.providers.thinvisor",
    "libvirt": "thinvisor.providers.libvirt",
    "vsphere": "thinvisor.providers.vsphere",
    "fake": "thinvisor.providers.fake",
}


def provider_class(kind: str) -> type[Provider]:
    """The ``Provider`` class of ``kind``; ``InvalidArgument`` naming ``provider`` if none."""
    if kind not in KINDS:
        raise InvalidArgument("provider", f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    cls: type[Provider] = importlib.import_module(KINDS[kind]).PROVIDER
    return cls


def open_provider(kind: str, connection: Connection) -> Provider:
    """A provider of ``kind`` for ``connection``, not yet connected."""
    return provider_class(kind)(connection)


__all__ = ["KINDS", "Connection", "Provider", "open_provider", "provider_class"]
