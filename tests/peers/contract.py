"""What every provider's peer gives the contract suite."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from thinvisor.providers import provider_class
from thinvisor.providers.base import Connection, Provider


@dataclass
class Peer:
    """A real (or, for ``fake``, in-memory) host one provider kind manages.

    ``vm`` is a stopped VM that boots (the appliance where the peer runs guests), which
    the suite may start and stop but leaves stopped; ``template`` a template on the host
    to create VMs from (None where the kind has no templates); ``network`` a network a
    new VM's NIC may use (None: create VMs without NICs).
    """

    kind: str
    connection: Connection
    vm: str
    template: str | None = None
    network: str | None = None
    wrong_password: Connection | None = None
    """The same host with credentials it refuses (None where it takes none)."""
    unreachable: Connection = field(
        default_factory=lambda: Connection("https://127.0.0.1:9", "u", "p")
    )
    """An address where nothing answers."""
    ready: Callable[[str], None] | None = None
    """Waits until a started VM's guest is up (the appliance's ready line), where the
    test can see it; given the VM's id."""

    def provider(self, connection: Connection | None = None) -> Provider:
        """A new, unconnected provider for this peer."""
        return provider_class(self.kind)(connection or self.connection)
