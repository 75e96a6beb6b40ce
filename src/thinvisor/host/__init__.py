"""The host: VM inventory, actions with state gating, and the QEMU engine."""
