"""QEMU processes: start one detached from thinvisor, find it again, learn why it ended.

A VM's QEMU is started in its own session and reparented away from the starting
process, so it outlives any thinvisor process. Its pidfile is the source of truth:
QEMU holds a POSIX lock on it while it runs and removes it on a clean exit, so

- pidfile locked            -> QEMU is running (the lock holder is its pid);
- pidfile present, unlocked -> QEMU ended abruptly (SIGKILL, crash);
- pidfile absent            -> QEMU exited cleanly, or never started.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from thinvisor.errors import QemuError
from thinvisor.fs import atomic_write, tail
from thinvisor.host.engine.paths import VmPaths

JAIL_SCRIPT = Path(__file__).with_name("jail.py")

log = logging.getLogger(__name__)

START_MARKER = "=== thinvisor: starting QEMU"
_FLOCK = "hhqqi"  # struct flock on Linux x86_64/aarch64: type, whence, start, len, pid
_SIGNAL_RE = re.compile(r"terminating on signal (\d+)(?: from pid (\d+))?")
_ERROR_RE = re.compile(r"^(?:\S+ )?qemu-system-\w+: (.+)$")


def locked_by(pidfile: Path) -> int | None:
    """The pid holding the POSIX lock on ``pidfile``, or None (no file, or unlocked)."""
    try:
        fd = os.open(pidfile, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        kind, _, _, _, pid = struct.unpack(_FLOCK, answer)
        return None if kind == fcntl.F_UNLCK else int(pid)
    finally:
        os.close(fd)


def running_pid(paths: VmPaths) -> int | None:
    """The pid of the VM's QEMU while it runs, else None."""
    return locked_by(paths.pidfile)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the command name in parentheses; Z is a zombie not yet reaped.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass(frozen=True)
class StopRecord:
    """What thinvisor asked of QEMU before it went away."""

    action: str
    reason: str
    time: float


def record_stop(paths: VmPaths, action: str, reason: str) -> None:
    data = {"action": action, "reason": reason, "time": time.time()}
    atomic_write(paths.stop_record, json.dumps(data))


def read_stop_record(paths: VmPaths) -> StopRecord | None:
    try:
        data = json.loads(paths.stop_record.read_text())
        return StopRecord(str(data["action"]), str(data["reason"]), float(data["time"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def last_run_log(paths: VmPaths) -> list[str]:
    """The lines QEMU logged during its last run (after the last start marker)."""
    text = tail(paths.qemu_log, 256 * 1024).decode(errors="replace")
    start = text.rfind(START_MARKER)
    body = text[start:] if start >= 0 else text
    return [line for line in body.splitlines()[1:] if line.strip()]


def exit_reason(paths: VmPaths) -> str | None:
    """Why the VM's QEMU is not running, or None if it never ran since the host booted."""
    if not paths.run_dir.exists():
        return None
    record = read_stop_record(paths)
    lines = last_run_log(paths)
    if paths.pidfile.exists():
        pid = paths.pidfile.read_text().strip() or "?"
        last = f"; last log line: {lines[-1]}" if lines else ""
        return f"QEMU (pid {pid}) ended abruptly without shutting down: killed or crashed{last}"
    if record is not None:
        return record.reason
    for line in reversed(lines):
        if m := _SIGNAL_RE.search(line):
            sender = f" from pid {m.group(2)}" if m.group(2) else ""
            name = signal.Signals(int(m.group(1))).name
            return f"QEMU terminated by {name}{sender}"
    errors = [m.group(1) for line in lines if (m := _ERROR_RE.match(line))]
    if errors:
        return f"QEMU exited: {errors[-1]}"
    return "guest powered off"


def _prepare_run_dir(paths: VmPaths) -> None:
    paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths.logs_dir.mkdir(parents=True, exist_ok=True)
    for stale in paths.run_dir.iterdir():
        # Sockets, pidfile and stop record of an earlier run; the jail's empty root.
        if stale.is_dir() and not stale.is_symlink():
            stale.rmdir()
        else:
            stale.unlink(missing_ok=True)


def spawn(
    argv: list[str],
    paths: VmPaths,
    *,
    pass_fds: Sequence[int] = (),
    cgroup_procs: Sequence[Path] = (),
    jail: Mapping[str, object] | None = None,
) -> None:
    """Start QEMU in its own session, detached, its output appended to ``qemu.log``.

    ``pass_fds`` (TAP devices) are inherited by QEMU under the same numbers. The
    launcher writes its pid into each of ``cgroup_procs`` before it execs QEMU, so that
    QEMU runs in the VM's cgroups from its first instruction. With ``jail`` (see
    ``engine/jail.py``) QEMU is exec'd through the jail launcher, which drops privileges.
    """
    if running_pid(paths) is not None:
        raise QemuError(f"QEMU is already running for {paths.vm_dir.name}")
    _prepare_run_dir(paths)
    if jail is not None:
        argv = _jailed(argv, paths, jail)
    launch_pid = paths.run_dir / "launch.pid"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with paths.qemu_log.open("ab") as logf:
        logf.write(f"{START_MARKER} {stamp}: {' '.join(argv)}\n".encode())
        logf.flush()
        # setsid -f forks: QEMU is reparented to init and outlives this process. The
        # shell records its own pid, which exec hands on to QEMU.
        enter = "".join(f"echo $$ > {shlex.quote(str(f))} || exit 125; " for f in cgroup_procs)
        script = f'echo $$ > "$0"; {enter}exec "$@"'
        try:
            subprocess.run(
                ["setsid", "-f", "sh", "-c", script, str(launch_pid), *argv],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                check=True,
                close_fds=True,
                pass_fds=tuple(pass_fds),
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            raise QemuError(f"cannot start QEMU: {exc}") from exc


def _jailed(argv: list[str], paths: VmPaths, jail: Mapping[str, object]) -> list[str]:
    """``argv`` run through the jail launcher; its spec written next to the pidfile."""
    spec_file = paths.run_dir / "jail.json"
    spec_file.write_text(json.dumps(jail))
    root = jail.get("root")
    if isinstance(root, str):
        Path(root).mkdir(mode=0o755, exist_ok=True)
    uid, gid = jail.get("uid"), jail.get("gid")
    if isinstance(uid, int) and isinstance(gid, int):
        os.chown(paths.run_dir, uid, gid)  # QEMU makes its sockets and pidfile there
    return [sys.executable, "-I", "-S", str(JAIL_SCRIPT), "launch", str(spec_file), "--", *argv]


async def wait_started(paths: VmPaths, timeout: float = 30.0) -> int:
    """Wait until QEMU serves QMP; raise ``QemuError`` with its log if it died first."""
    launch_pid = paths.run_dir / "launch.pid"
    deadline = time.monotonic() + timeout
    pid: int | None = None
    while time.monotonic() < deadline:
        if pid is None:
            text = launch_pid.read_text().strip() if launch_pid.exists() else ""
            pid = int(text) if text.isdigit() else None
        if pid is not None and not _alive(pid):
            raise QemuError(_startup_failure(paths))
        if paths.qmp_socket.exists() and running_pid(paths) is not None:
            return running_pid(paths) or pid or 0
        await asyncio.sleep(0.02)
    raise QemuError(f"QEMU did not come up within {timeout:.0f} s; see {paths.qemu_log}")


def failure_detail(paths: VmPaths, exc: Exception) -> str:
    """What QEMU itself logged about a failure, when it logged anything; else ``exc``."""
    errors = [m.group(1) for line in last_run_log(paths) if (m := _ERROR_RE.match(line))]
    return f"QEMU: {errors[-1]}" if errors else str(exc)


def _startup_failure(paths: VmPaths) -> str:
    lines = last_run_log(paths)
    errors = [m.group(1) for line in lines if (m := _ERROR_RE.match(line))]
    detail = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"QEMU failed to start: {detail}"


async def wait_gone(paths: VmPaths, pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for QEMU to exit; True when it did."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # a kernel before 5.3: look every 20 ms
        return await _poll_gone(pid, timeout)
    # QEMU is not our child, but its pidfd still turns readable the moment it exits.
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await asyncio.wait_for(exited, timeout)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return not _alive(pid)


async def _poll_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        await asyncio.sleep(0.02)
    return not _alive(pid)


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
