"""thinvisor: a thin hypervisor host and multi-vendor virtualization manager."""

__version__ = "0.1.0"
__all__ = ["__version__"]
