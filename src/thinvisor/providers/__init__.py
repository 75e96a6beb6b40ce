"""The center's drivers for managed hosts, one module per kind (``base`` is the interface).

Provider modules import their peer's library (libvirt, pyVmomi) only when used:
``provider_class(kind)`` imports the module of one kind.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from thinvisor.errors import InvalidArgument
from thinvisor.providers.base import Connection, Provider

#: Every provider kind, with the module that holds its ``Provider`` class.
KINDS: dict[str, str] = {
    "thinvisor": "thinvisor.providers.thinvisor",
    "libvirt": "thinvisor.providers.libvirt",
    "vsphere": "thinvisor.providers.vsphere",
    "fake": "thinvisor.providers.fake",
}

#: The port of a thinvisor host agent where an address names neither scheme nor port.
THINVISOR_PORT = 8443
#: The port of a vCenter's or an ESXi's API where an address names none.
VSPHERE_PORT = 443
_SCHEME_PORTS = {"https": 443, "http": 80}


def provider_class(kind: str) -> type[Provider]:
    """The ``Provider`` class of ``kind``; ``InvalidArgument`` naming ``provider`` if none."""
    if kind not in KINDS:
        raise InvalidArgument("provider", f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    cls: type[Provider] = importlib.import_module(KINDS[kind]).PROVIDER
    return cls


def open_provider(kind: str, connection: Connection) -> Provider:
    """A provider of ``kind`` for ``connection``, not yet connected."""
    return provider_class(kind)(connection)


def canonical_address(kind: str, address: str) -> str:
    """The one spelling of ``address`` for a host of ``kind``, so that a host given in
    two spellings is seen as one host.

    - thinvisor: ``https://host:port``: https where no scheme is given, the host in
      lower case, the port spelled out (8443 where neither scheme nor port is given, as
      ``thinvisor login`` reads it; the scheme's own where only the scheme is), no path;
    - vsphere: ``https://host:port`` (443 where no port is given), ``/sdk`` dropped;
    - libvirt: the URI without surrounding spaces (libvirt reads everything else in a
      URI, a trailing slash included, so nothing else is changed);
    - fake: the address as given.

    ``InvalidArgument`` naming ``address`` if it is not an address of ``kind``
    (``provider`` if ``kind`` is not a provider).
    """
    if kind not in KINDS:
        provider_class(kind)  # raises, naming the kinds
    if not isinstance(address, str) or not address.strip():
        raise InvalidArgument("address", "must not be empty")
    if kind == "thinvisor":
        return _url_address(address, ("https", "http"), "/api/v1", THINVISOR_PORT)
    if kind == "vsphere":
        return _url_address(address, ("https",), "/sdk", VSPHERE_PORT)
    if kind == "libvirt":
        return address.strip()
    return address


def _url_address(address: str, schemes: tuple[str, ...], path: str, port: int) -> str:
    """``scheme://host:port`` for ``address``; ``path`` says no more than its absence."""
    text = address.strip()
    bare = "://" not in text
    parts = urlsplit(f"{schemes[0]}://{text}" if bare else text)
    if parts.scheme not in schemes:
        raise InvalidArgument("address", f"{address!r} is not {schemes[0]}://HOST[:PORT]")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument("address", f"{address!r}: give the user with --user, not here")
    if parts.path.rstrip("/") not in ("", path) or parts.query or parts.fragment:
        raise InvalidArgument("address", f"{address!r}: give the host's address without a path")
    if not parts.hostname:
        raise InvalidArgument("address", f"{address!r} names no host")
    try:
        given = parts.port
    except ValueError:
        raise InvalidArgument("address", f"{address!r} has no valid port") from None
    if given is None:
        given = port if bare else _SCHEME_PORTS[parts.scheme]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{given}"


__all__ = [
    "KINDS",
    "Connection",
    "Provider",
    "canonical_address",
    "open_provider",
    "provider_class",
]
