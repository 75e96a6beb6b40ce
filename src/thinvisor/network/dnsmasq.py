"""DHCP and DNS for the guests of NAT switches: one dnsmasq per switch.

dnsmasq daemonizes itself (it is reparented to init), so it outlives the agent; a new
agent adopts it by its pid file. The files of switch ``<s>``:

- ``<run_dir>/network/<s>/dnsmasq.conf``: its whole configuration, written atomically;
  the instance runs with ``--conf-file=`` naming it, which is how its process is told
  apart from any other dnsmasq (``/proc/<pid>/cmdline``);
- ``<run_dir>/network/<s>/dnsmasq.pid``: written by dnsmasq once it runs;
- ``<state_dir>/network/<s>.leases``: its leases, kept across host reboots.

The configuration is made by a pure function (``dnsmasq_config``) that the unit tests
check. dnsmasq reads none of the host's dnsmasq or hosts files and changes no host DNS
setting: it only serves the switch's bridge, with the host's resolvers as upstream.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from thinvisor.errors import BackendError, InvalidArgument
from thinvisor.fs import atomic_write
from thinvisor.model.vm import check_name
from thinvisor.network.model import check_ifname

_FALLBACK_BINARY = "/usr/sbin/dnsmasq"
# Debian's dnsmasq-base creates this account; a dedicated user keeps a compromised
# dnsmasq away from other "nobody" processes (QEMU may run as nobody).
_SERVICE_USERS = ("dnsmasq", "nobody")
LEASE_TIME = "1h"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class Lease:
    """One DHCP lease, as dnsmasq records it. ``expiry`` is a Unix time, 0 for never."""

    expiry: int
    mac: str
    ip: IPv4Address
    hostname: str | None


def parse_leases(text: str) -> list[Lease]:
    """The IPv4 leases in a dnsmasq lease file; other lines (DHCPv6, ``duid``) are skipped.

    A line reads ``<expiry> <mac> <ip> <hostname or *> <client-id or *>``.
    """
    leases = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[0].isdigit():
            continue
        try:
            ip = IPv4Address(fields[2])
        except ValueError:
            continue
        hostname = None if fields[3] == "*" else fields[3]
        leases.append(Lease(int(fields[0]), fields[1].lower(), ip, hostname))
    return leases


def has_nameservers(resolv_conf: str) -> bool:
    """Whether a resolv.conf text names at least one name server."""
    for line in resolv_conf.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            return True
    return False


def service_user() -> tuple[str, str]:
    """The unprivileged user and group dnsmasq drops to after start-up."""
    for name in _SERVICE_USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        try:
            return name, grp.getgrgid(entry.pw_gid).gr_name
        except KeyError:
            continue
    raise BackendError("no unprivileged account for dnsmasq (neither dnsmasq nor nobody)")


def dnsmasq_config(
    *,
    bridge: str,
    address: IPv4Interface,
    dhcp_range: tuple[IPv4Address, IPv4Address] | None,
    pid_file: Path,
    lease_file: Path,
    user: tuple[str, str],
    upstream: bool,
) -> str:
    """The configuration of one switch's dnsmasq.

    ``address`` is the host's address on ``bridge``; ``dhcp_range`` None serves DNS only.
    ``upstream`` False (no name server in the host's resolv.conf) answers locally only.
    """
    lines = [
        "# Written by thinvisor; rewritten on every change.",
        "strict-order",
        f"pid-file={pid_file}",
        # dnsmasq opens its pid file and lease file as root, then drops to this user; it
        # rewrites the lease file in place through the descriptor it already holds, so
        # it does not need user=root even though the file's directory is root's.
        f"user={user[0]}",
        f"group={user[1]}",
        # Only the switch's bridge: bind-dynamic binds to its address alone (another
        # dnsmasq may serve other bridges or the host) and follows address changes.
        "except-interface=lo",
        "bind-dynamic",
        f"interface={bridge}",
        f"listen-address={address.ip}",
        # Guests learn nothing of the host's own names.
        "no-hosts",
        "domain-needed",
        "bogus-priv",
    ]
    if not upstream:
        lines.append("no-resolv")
    if dhcp_range is not None:
        start, end = dhcp_range
        lines += [
            f"dhcp-range={start},{end},{address.netmask},{LEASE_TIME}",
            "dhcp-no-override",
            "dhcp-authoritative",
            f"dhcp-leasefile={lease_file}",
            f"dhcp-lease-max={int(end) - int(start) + 1}",
        ]
    return "\n".join(lines) + "\n"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the command name in parentheses; Z is a zombie not yet reaped.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> list[str]:
    """A process's arguments; none while it exits (its memory is gone, its files not yet)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return raw.decode(errors="replace").rstrip("\0").split("\0") if raw else []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _check_switch(switch: str) -> str:
    try:
        return check_name(switch)
    except ValueError as exc:
        raise InvalidArgument("switch", str(exc)) from None


class Dnsmasq:
    """The dnsmasq instances of the host's NAT switches, found again by their files."""

    def __init__(self, run_dir: Path, state_dir: Path, binary: str = "dnsmasq") -> None:
        self.run_dir = run_dir.absolute() / "network"
        self.lease_dir = state_dir.absolute() / "network"
        fallback = _FALLBACK_BINARY if binary == "dnsmasq" else binary
        self.binary = shutil.which(binary) or fallback
        self.resolv_conf = Path("/etc/resolv.conf")

    def conf_file(self, switch: str) -> Path:
        return self.run_dir / _check_switch(switch) / "dnsmasq.conf"

    def pid_file(self, switch: str) -> Path:
        return self.run_dir / _check_switch(switch) / "dnsmasq.pid"

    def lease_file(self, switch: str) -> Path:
        return self.lease_dir / f"{_check_switch(switch)}.leases"

    def config(
        self,
        switch: str,
        bridge: str,
        address: IPv4Interface,
        dhcp_range: tuple[IPv4Address, IPv4Address] | None,
    ) -> str:
        """The configuration ``ensure`` would run switch ``switch``'s dnsmasq with."""
        try:
            check_ifname(bridge)
        except ValueError as exc:
            raise InvalidArgument("bridge", str(exc)) from None
        try:
            upstream = has_nameservers(self.resolv_conf.read_text())
        except OSError:
            upstream = False
        return dnsmasq_config(
            bridge=bridge,
            address=address,
            dhcp_range=dhcp_range,
            pid_file=self.pid_file(switch),
            lease_file=self.lease_file(switch),
            user=service_user(),
            upstream=upstream,
        )

    def ensure(
        self,
        switch: str,
        bridge: str,
        address: IPv4Interface,
        dhcp_range: tuple[IPv4Address, IPv4Address] | None,
    ) -> int:
        """Make switch ``switch``'s dnsmasq run with this configuration; return its pid.

        A running instance with the same configuration is adopted as it is; one started
        with another configuration is restarted. ``dhcp_range`` None serves DNS only.
        """
        text = self.config(switch, bridge, address, dhcp_range)
        pid = self.running(switch)
        if pid is not None:
            with contextlib.suppress(FileNotFoundError):
                if self.conf_file(switch).read_text() == text:
                    return pid
            self.stop(switch)
        self._wait_exiting(switch)
        return self._start(switch, text)

    def _wait_exiting(self, switch: str) -> None:
        """Wait for a killed instance that is still exiting: it may hold its sockets yet."""
        pid = _read_pid(self.pid_file(switch))
        comm = Path(self.binary).name[:15]  # the kernel keeps 15 characters of the name
        if pid is not None and _alive(pid) and not _cmdline(pid) and _comm(pid) == comm:
            _wait_gone(pid, STOP_TIMEOUT)

    def _start(self, switch: str, text: str) -> int:
        conf, pid_file = self.conf_file(switch), self.pid_file(switch)
        conf.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.lease_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        pid_file.unlink(missing_ok=True)
        atomic_write(conf, text)
        what = f"dnsmasq of switch {switch!r}"
        # A file, not a pipe, for its output: the daemon keeps no end of a pipe open then.
        with tempfile.TemporaryFile() as out:
            try:
                # The foreground dnsmasq waits until its daemon has set up, then exits
                # with the daemon's verdict.
                proc = subprocess.run(
                    [self.binary, f"--conf-file={conf}"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    timeout=START_TIMEOUT,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise BackendError(f"{what}: cannot start {self.binary}: {exc}") from exc
            out.seek(0)
            printed = out.read().decode(errors="replace").strip()
        if proc.returncode != 0:
            self._remove_run_files(switch)
            raise BackendError(f"{what} failed to start: {printed or f'exit {proc.returncode}'}")
        deadline = time.monotonic() + START_TIMEOUT
        while (pid := self.running(switch)) is None:
            if time.monotonic() >= deadline:
                detail = f": {printed}" if printed else ""
                raise BackendError(f"{what} did not come up{detail}")
            time.sleep(0.02)
        return pid

    def running(self, switch: str) -> int | None:
        """The pid of switch ``switch``'s dnsmasq while it runs, else None."""
        conf = self.conf_file(switch)
        pid = _read_pid(self.pid_file(switch))
        if pid is None or not _alive(pid):
            return None
        # The pid may have been reused by another process since.
        return pid if f"--conf-file={conf}" in _cmdline(pid) else None

    def stop(self, switch: str, timeout: float = STOP_TIMEOUT) -> bool:
        """End switch ``switch``'s dnsmasq and remove its run files (its leases are kept).

        SIGTERM, then SIGKILL after ``timeout`` seconds. False when none was running.
        """
        pid = self.running(switch)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not _wait_gone(pid, timeout):
                    raise BackendError(f"dnsmasq of switch {switch!r} (pid {pid}) did not end")
        self._remove_run_files(switch)
        return pid is not None

    def _remove_run_files(self, switch: str) -> None:
        self.conf_file(switch).unlink(missing_ok=True)
        self.pid_file(switch).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only when empty
            self.conf_file(switch).parent.rmdir()

    def instances(self) -> dict[str, int]:
        """Every switch with a live dnsmasq under the run directory, with its pid."""
        found: dict[str, int] = {}
        if not self.run_dir.is_dir():
            return found
        for entry in sorted(self.run_dir.iterdir()):
            if not (entry / "dnsmasq.pid").exists():
                continue
            with contextlib.suppress(InvalidArgument):  # not a switch's directory
                pid = self.running(entry.name)
                if pid is not None:
                    found[entry.name] = pid
        return found

    def leases(self, switch: str) -> list[Lease]:
        """The DHCP leases of switch ``switch``'s dnsmasq; none when it never gave one."""
        try:
            return parse_leases(self.lease_file(switch).read_text())
        except FileNotFoundError:
            return []
