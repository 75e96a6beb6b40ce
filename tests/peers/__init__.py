"""Real peers of the center for tests: host agents, libvirtd, a vSphere simulator,
PostgreSQL; each started by the tests and ended by them, leaving nothing behind."""
