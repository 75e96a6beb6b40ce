"""thinvisor's error tree.

Every error a caller can see is one of these. Each carries the HTTP status the REST API
answers with and the CIM status code the CIM server answers with, so that one translator
per edge maps them. Backend failures (QMP errors, ``subprocess`` failures) are translated
into these at the engine boundary with ``raise ... from exc``.

    ThinvisorError                      500  CIM_ERR_FAILED
     +-- InvalidArgument                400  CIM_ERR_INVALID_PARAMETER   (field, reason)
     +-- Unauthenticated                401  CIM_ERR_ACCESS_DENIED       (wrong or no credentials)
     +-- TooManyAttempts                429  CIM_ERR_ACCESS_DENIED       (retry_after seconds)
     +-- NotFound                       404  CIM_ERR_NOT_FOUND
     +-- AlreadyExists                  409  CIM_ERR_ALREADY_EXISTS
     +-- InvalidState                   409  CIM_ERR_FAILED              (vm, state, action)
     +-- Busy                           409  CIM_ERR_FAILED
     +-- InsufficientResources          409  CIM_ERR_FAILED
     +-- InvalidConfig                  422  CIM_ERR_FAILED              (a corrupt vm.toml)
     +-- Unsupported                    409  CIM_ERR_NOT_SUPPORTED       (a provider cannot do it)
     +-- Disconnected                   409  CIM_ERR_FAILED              (the center lost the host)
     +-- BackendError                   502  CIM_ERR_FAILED
          +-- QemuError                 (QEMU failed to start, or a QMP command failed)
          +-- ImageError                (qemu-img failed)
          +-- ApplianceBuildError       (the appliance could not be built)
          +-- ProviderError             (a managed host's API failed: libvirt, vSphere, an agent)
               +-- Unreachable          (no connection to the host)
               +-- CredentialsRefused   (the host refused the center's credentials)
               +-- CertificateMismatch  (the host's TLS certificate is not the pinned one)
"""

from __future__ import annotations

# CIM status codes (DSP0200); numeric here so that this module imports nothing.
CIM_ERR_FAILED = 1
CIM_ERR_ACCESS_DENIED = 2
CIM_ERR_INVALID_PARAMETER = 4
CIM_ERR_NOT_FOUND = 6
CIM_ERR_NOT_SUPPORTED = 7
CIM_ERR_ALREADY_EXISTS = 11


class ThinvisorError(Exception):
    """The root of every error thinvisor raises on purpose."""

    http_status = 500
    cim_status = CIM_ERR_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(ThinvisorError):
    """A value given by the caller is wrong; ``field`` names it."""

    http_status = 400
    cim_status = CIM_ERR_INVALID_PARAMETER

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class Unauthenticated(ThinvisorError):
    http_status = 401
    cim_status = CIM_ERR_ACCESS_DENIED


class TooManyAttempts(ThinvisorError):
    """Failed logins from one address are slowed down: try again after ``retry_after``."""

    http_status = 429
    cim_status = CIM_ERR_ACCESS_DENIED

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins; try again in {retry_after:.0f} s")
        self.retry_after = retry_after


class NotFound(ThinvisorError):
    http_status = 404
    cim_status = CIM_ERR_NOT_FOUND


class AlreadyExists(ThinvisorError):
    http_status = 409
    cim_status = CIM_ERR_ALREADY_EXISTS


class InvalidState(ThinvisorError):
    """An action was asked of a VM in a state that does not allow it; nothing was done."""

    http_status = 409

    def __init__(self, vm: str, state: str, action: str) -> None:
        super().__init__(f"vm {vm!r}: cannot {action} while {state}")
        self.vm = vm
        self.state = state
        self.action = action


class Busy(ThinvisorError):
    """Another operation holds the VM."""

    http_status = 409


class InsufficientResources(ThinvisorError):
    http_status = 409


class InvalidConfig(ThinvisorError):
    """A stored configuration cannot be read; the VM is listed as invalid."""

    http_status = 422


class Unsupported(ThinvisorError):
    """The provider of a host cannot do this (it lacks the capability); nothing was done."""

    http_status = 409
    cim_status = CIM_ERR_NOT_SUPPORTED


class Disconnected(ThinvisorError):
    """The center has lost its connection to the host that would do this; nothing was done."""

    http_status = 409


class BackendError(ThinvisorError):
    http_status = 502


class QemuError(BackendError):
    pass


class ImageError(BackendError):
    pass


class ApplianceBuildError(BackendError):
    pass


class ProviderError(BackendError):
    """A managed host's API (a thinvisor agent, libvirt, vSphere) failed."""


class Unreachable(ProviderError):
    """No connection to the host could be made, or it stopped answering."""


class CredentialsRefused(ProviderError):
    """The host refused the credentials it was given."""


class CertificateMismatch(ProviderError):
    """The host presented another TLS certificate than the one pinned; ``seen`` is its
    SHA-256 fingerprint, ``pinned`` the one expected (None: none was given)."""

    def __init__(self, address: str, seen: str, pinned: str | None) -> None:
        expected = f"pinned {pinned}" if pinned else "none pinned"
        super().__init__(f"{address}: the host's certificate has fingerprint {seen} ({expected})")
        self.address = address
        self.seen = seen
        self.pinned = pinned
