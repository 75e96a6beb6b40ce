"""thinvisor's typed QMP vocabulary, on top of the ``qemu.qmp`` library.

A ``Monitor`` is one QMP session with one VM's QEMU. QEMU's QMP socket serves one client
at a time, so sessions are short: open, do the operation, close. Every QMP or socket
failure leaves this module as a ``QemuError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from qemu.qmp import EventListener, QMPClient, QMPError
from qemu.qmp.protocol import ConnectError
from qemu.qmp.qmp_client import ExecuteError, GreetingError, NegotiationError

from thinvisor.errors import QemuError
from thinvisor.model.resources import DiskLimits

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
NEGOTIATION_TRIES = 3
COMMAND_TIMEOUT_S = 60.0
#: ``DiskLimits`` fields -> QMP's throttle arguments (query-block reports the same names).
THROTTLE_FIELDS = {
    "bps_total": "bps",
    "bps_read": "bps_rd",
    "bps_write": "bps_wr",
    "iops_total": "iops",
    "iops_read": "iops_rd",
    "iops_write": "iops_wr",
}


class Monitor:
    """One QMP session with a VM's QEMU, as an async context manager."""

    def __init__(self, vm: str, socket: Path, *, connect_timeout: float = CONNECT_TIMEOUT_S):
        self.vm = vm
        self.socket = socket
        self.connect_timeout = connect_timeout
        self._client = QMPClient(f"thinvisor:{vm}")

    async def __aenter__(self) -> Self:
        for attempt in range(1, NEGOTIATION_TRIES + 1):
            try:
                connect = self._client.connect(str(self.socket))
                await asyncio.wait_for(connect, self.connect_timeout)
                return self
            except ConnectError as exc:
                # An event QEMU sends (a block job's, say) can overtake the answer to
                # qmp_capabilities, and output QEMU still held for an earlier client can
                # come before the greeting; qemu.qmp expects neither: a new session then.
                retry = isinstance(exc.exc, NegotiationError | GreetingError)
                if retry and attempt < NEGOTIATION_TRIES:
                    log.debug("vm %s: QMP negotiation failed, again: %s", self.vm, exc)
                    continue
                raise self._failed(exc) from exc
            except (QMPError, OSError, TimeoutError) as exc:
                raise self._failed(exc) from exc
        raise AssertionError("unreachable")

    def _failed(self, exc: BaseException) -> QemuError:
        return QemuError(f"vm {self.vm!r}: cannot connect to QMP at {self.socket}: {exc}")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self._client.disconnect()
        except (QMPError, OSError, EOFError) as exc:
            # QEMU may already be gone (quit, guest poweroff): nothing left to close.
            log.debug("vm %s: QMP disconnect: %s", self.vm, exc)

    async def execute(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Run one QMP command; QMP errors become ``QemuError`` naming the command."""
        try:
            return await asyncio.wait_for(
                self._client.execute(name, args or None), COMMAND_TIMEOUT_S
            )
        except ExecuteError as exc:
            raise QemuError(f"vm {self.vm!r}: {name}: {exc.error.error.desc}") from exc
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            raise QemuError(f"vm {self.vm!r}: {name}: {exc or type(exc).__name__}") from exc

    async def command(self, name: str, **args: Any) -> Any:
        """``execute`` with Python keyword names (``node_name`` for ``node-name``)."""
        return await self.execute(name, {k.replace("_", "-"): v for k, v in args.items()})

    # The vocabulary. Names follow QMP's, in thinvisor's spelling.

    async def status(self) -> str:
        """QEMU's run state: running, paused, inmigrate, postmigrate, shutdown, ..."""
        reply = await self.command("query-status")
        return str(reply["status"])

    async def stop(self) -> None:
        await self.command("stop")

    async def cont(self) -> None:
        await self.command("cont")

    async def system_reset(self) -> None:
        await self.command("system_reset")

    async def system_powerdown(self) -> None:
        await self.command("system_powerdown")

    async def quit(self) -> None:
        try:
            await self.command("quit")
        except QemuError as exc:
            # QEMU may close the socket before its reply arrives.
            log.debug("vm %s: quit: %s", self.vm, exc)

    async def blockdev_add(self, options: dict[str, Any]) -> None:
        await self.execute("blockdev-add", options)

    async def blockdev_del(self, node_name: str) -> None:
        await self.command("blockdev-del", node_name=node_name)

    async def device_add(self, options: dict[str, Any]) -> None:
        await self.execute("device_add", options)

    async def device_del(self, device_id: str, timeout: float = 30.0) -> None:
        """Unplug a device and wait until the guest has let it go."""
        listener = EventListener("DEVICE_DELETED")
        with self._client.listen(listener):
            await self.command("device_del", id=device_id)
            try:
                async with asyncio.timeout(timeout):
                    async for event in listener:
                        data = event.get("data")
                        if isinstance(data, dict) and data.get("device") == device_id:
                            return
            except TimeoutError:
                raise QemuError(
                    f"vm {self.vm!r}: the guest did not release device {device_id!r} "
                    f"within {timeout:.0f} s"
                ) from None

    async def change_medium(self, device_id: str, filename: str) -> None:
        await self.command(
            "blockdev-change-medium",
            id=device_id,
            filename=filename,
            format="raw",
            read_only_mode="read-only",
        )

    async def eject(self, device_id: str) -> None:
        await self.command("eject", id=device_id, force=True)

    async def block_resize(self, node_name: str, size: int) -> None:
        await self.command("block_resize", node_name=node_name, size=size)

    async def block_set_io_throttle(self, device_id: str, limits: DiskLimits | None) -> None:
        """Set the I/O limits of a disk's guest device, by its qdev id or QOM path (see
        ``argv.disk_device_path``); None, or ``DiskLimits`` with nothing set, removes them."""
        limits = limits or DiskLimits()
        # QMP wants all six, 0 meaning unlimited; its names are spelt with '_'.
        args = {
            qmp_name: getattr(limits, field) or 0 for field, qmp_name in THROTTLE_FIELDS.items()
        }
        await self.execute("block_set_io_throttle", {"id": device_id, **args})

    async def balloon(self, target_bytes: int) -> None:
        """Ask the guest to shrink (or grow back) to ``target_bytes`` of memory."""
        await self.command("balloon", value=target_bytes)

    async def query_balloon(self) -> int:
        """The guest's memory now, in bytes, as its balloon driver last reported it."""
        reply = await self.command("query-balloon")
        return int(reply["actual"])

    async def block_stats(self) -> list[dict[str, Any]]:
        """The I/O counters of the guest's block devices (``query-blockstats``)."""
        return list(await self.command("query-blockstats"))

    async def balloon_actual(self) -> int | None:
        """``query_balloon``, or None when the VM has no balloon device."""
        try:
            return await self.query_balloon()
        except QemuError as exc:
            cause = exc.__cause__
            if isinstance(cause, ExecuteError) and cause.error_class == "DeviceNotActive":
                return None
            raise

    async def set_link(self, device_id: str, *, up: bool) -> None:
        """Plug or unplug a NIC's virtual cable: the guest sees its link go up or down."""
        await self.execute("set_link", {"name": device_id, "up": up})

    async def netdev_add_tap_fd(self, netdev_id: str, fd: int) -> None:
        """Add a TAP backend from a descriptor of ours (passed over the QMP socket)."""
        await self.getfd(netdev_id, fd)
        try:
            await self.command("netdev_add", type="tap", id=netdev_id, fd=netdev_id)
        except QemuError:
            with contextlib.suppress(QemuError):
                await self.command("closefd", fdname=netdev_id)
            raise

    async def netdev_del(self, netdev_id: str) -> None:
        await self.command("netdev_del", id=netdev_id)

    async def getfd(self, fdname: str, fd: int) -> None:
        """Hand an open file descriptor to QEMU under ``fdname``."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise QemuError(f"vm {self.vm!r}: passing a file descriptor: {exc}") from exc
        await self.command("getfd", fdname=fdname)

    async def migrate_to_fd(self, fd: int, poll_s: float = 0.05) -> None:
        """Save the VM's state into ``fd`` (an open file) and wait for completion."""
        await self.getfd("thinvisor-state", fd)
        await self.command("migrate", uri="fd:thinvisor-state")
        await self._wait_migration(poll_s)

    async def incoming_from_fd(self, fd: int, poll_s: float = 0.05) -> None:
        """Load the VM's state from ``fd``; QEMU must have been started with -incoming defer."""
        await self.getfd("thinvisor-state", fd)
        await self.command("migrate-incoming", uri="fd:thinvisor-state")
        while True:
            status = await self.status()
            if status != "inmigrate":
                break
            await asyncio.sleep(poll_s)
        info = await self.command("query-migrate")
        if info.get("status") == "failed" or status not in ("paused", "postmigrate", "running"):
            reason = info.get("error-desc", f"run state {status}")
            raise QemuError(f"vm {self.vm!r}: restoring the saved state failed: {reason}")

    async def _wait_migration(self, poll_s: float) -> None:
        while True:
            info = await self.command("query-migrate")
            state = info.get("status")
            if state == "completed":
                return
            if state in ("failed", "cancelled"):
                reason = info.get("error-desc", state)
                raise QemuError(f"vm {self.vm!r}: saving the state failed: {reason}")
            await asyncio.sleep(poll_s)
