"""TAP devices owned by a file descriptor: the TAP lives exactly as long as its QEMU.

The agent opens ``/dev/net/tun`` and creates the TAP (not persistent), joins it to its
switch, and hands the descriptor to QEMU (``-netdev tap,fd=N`` at start, QMP ``getfd``
for hot-plug). When QEMU exits, for whatever reason, the kernel removes the TAP: a
crashed agent or VM cannot leak one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from thinvisor.errors import AlreadyExists, BackendError, InvalidArgument
from thinvisor.network.model import check_ifname

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_IFF_TUN_EXCL = 0x8000  # fail if the device exists, instead of attaching to it
_IFREQ = "16sH22x"  # struct ifreq: name, flags, padding to 40 bytes
TUN_DEVICE = "/dev/net/tun"


def open_tap(name: str) -> int:
    """Create the TAP ``name`` and return the descriptor that owns it (close-on-exec).

    The TAP carries virtio-net headers (QEMU's ``vnet_hdr``) and is removed by the kernel
    when the last descriptor closes. Refuses a name that is taken (``AlreadyExists``).
    """
    try:
        check_ifname(name)
    except ValueError as exc:
        raise InvalidArgument("tap", str(exc)) from None
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise BackendError(f"TAP {name!r}: cannot open {TUN_DEVICE}: {exc.strerror}") from exc
    flags = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR | _IFF_TUN_EXCL
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack(_IFREQ, name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EBUSY:
            raise AlreadyExists(f"interface {name!r} already exists") from exc
        if exc.errno == errno.EPERM:
            raise BackendError(f"TAP {name!r}: not permitted (needs CAP_NET_ADMIN)") from exc
        raise BackendError(f"TAP {name!r}: {exc.strerror}") from exc
    return fd
