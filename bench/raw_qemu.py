"""QEMU started by hand: the very command line thinvisor builds for a VM, exec'd directly.

This is the floor any manager sits on: no agent, no daemon, no RPC; one ``fork`` and
``exec`` of ``qemu-system-x86_64`` with thinvisor's arguments (same machine, devices,
sandbox, QMP socket, serial console socket and log), its own files in a temporary
directory. Power-off is what one does by hand: ``kill`` (SIGTERM), then ``wait``.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from thinvisor.config import HostConfig
from thinvisor.host import hostinfo
from thinvisor.host.engine.accel import AccelChoice, choose_accel
from thinvisor.host.engine.argv import build_argv
from thinvisor.host.engine.paths import VmPaths
from thinvisor.model.vm import KernelBoot, VmSpec

STOP_TIMEOUT_S = 30.0


class RawQemu:
    """One VM run by hand from ``spec``; its kernel and initrd are copied from
    ``source_dir`` (a thinvisor VM directory) as the spec names them."""

    def __init__(self, spec: VmSpec, source_dir: Path, accel: AccelChoice | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="tvq", dir="/tmp"))
        try:
            self.spec = spec
            self.paths = VmPaths(self.root / spec.name, self.root / "run")
            self.paths.logs_dir.mkdir(parents=True)
            self.paths.run_dir.mkdir(mode=0o700)
            if isinstance(spec.boot, KernelBoot):
                for name in (spec.boot.kernel, spec.boot.initrd):
                    if name is not None:
                        shutil.copyfile(source_dir / name, self.paths.resolve(name))
            accel = accel or choose_accel(HostConfig().accel)
            self.argv = build_argv(
                spec,
                self.paths,
                accel,
                qemu_binary=HostConfig().qemu_binary,
                tsc_khz=hostinfo.tsc_khz(),
            )
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def serial_log(self) -> Path:
        return self.paths.serial_log(self.spec.serials[0].name)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        """Exec QEMU; the seconds until the exec returned (the spawn time)."""
        if self.proc is not None:
            raise RuntimeError(f"{self.spec.name}: QEMU already runs (pid {self.proc.pid})")
        with self.paths.qemu_log.open("ab") as log:
            started = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True
            )
            return time.monotonic() - started

    def exited(self) -> bool:
        """Whether QEMU has ended (and been reaped); its log tells why."""
        return self.proc is None or self.proc.poll() is not None

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal QEMU and reap it (SIGKILL if it has not gone in time)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """End QEMU if it runs, and remove every file."""
        try:
            self.stop(signal.SIGKILL)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RawQemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
