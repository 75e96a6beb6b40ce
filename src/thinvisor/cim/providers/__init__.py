"""The CIM classes thinvisor implements, one module per group of profiles."""

from __future__ import annotations

from thinvisor.cim.provider import Registry


def default_registry() -> Registry:
    """Every provider of the host's CIM server."""
    from thinvisor.cim.providers import hardware, interop, logs, virtualization

    registry = Registry()
    for module in (interop, hardware, logs, virtualization):
        for provider in module.providers():
            registry.register(provider)
    return registry


__all__ = ["default_registry"]
