"""The ``thinvisor`` command."""
