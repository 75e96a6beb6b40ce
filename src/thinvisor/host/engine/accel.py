"""Which accelerator QEMU uses: KVM where it really runs a guest, TCG everywhere else.

A ``/dev/kvm`` that opens is not enough: a nested backend such as PVM (``kvm_pvm``)
answers the whole API and even runs real-mode code, but by emulating it instruction by
instruction, hundreds of times slower than the CPU would (a Linux kernel then never gets
past its decompressor). So ``auto`` runs a tiny real-mode guest through the KVM ioctls
in a child process with a timeout: a counted loop, then ``mov al, 0x42; out 0x10, al;
hlt``. KVM is chosen only when the guest exits with that IO write, then halts, and the
loop took about the CPU time hardware virtualization needs.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import json
import logging
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from thinvisor.errors import InvalidArgument

log = logging.getLogger(__name__)

AccelName = Literal["kvm", "tcg"]
AccelSetting = Literal["auto", "kvm", "tcg"]

#: What a probe returns: None when KVM ran the test guest, otherwise what failed.
Probe = Callable[[], str | None]

KVM_DEVICE = Path("/dev/kvm")
PROBE_TIMEOUT_S = 5.0

# ioctl numbers from <linux/kvm.h> (x86_64).
_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
_KVM_GET_VCPU_MMAP_SIZE = 0xAE04
_KVM_CREATE_VCPU = 0xAE41
_KVM_SET_USER_MEMORY_REGION = 0x4020AE46
_KVM_RUN = 0xAE80
_KVM_GET_REGS = 0x8090AE81
_KVM_SET_REGS = 0x4090AE82
_KVM_GET_SREGS = 0x8138AE83
_KVM_SET_SREGS = 0x4138AE84
_KVM_API_VERSION = 12
_KVM_EXIT_IO = 2
_KVM_EXIT_HLT = 5
_KVM_EXIT_IO_OUT = 1

_GUEST_ADDR = 0x1000
_GUEST_PORT = 0x10
_GUEST_VALUE = 0x42
# Hardware runs this loop in about a millisecond; PVM's emulator needs a third of a second.
_GUEST_LOOPS = 500_000
_GUEST_CPU_LIMIT_S = 0.05
# mov ecx, LOOPS; again: dec ecx; jnz again; mov al, 0x42; out 0x10, al; hlt
_GUEST_CODE = (
    bytes([0x66, 0xB9])
    + _GUEST_LOOPS.to_bytes(4, "little")
    + bytes([0x66, 0x49, 0x75, 0xFC])
    + bytes([0xB0, _GUEST_VALUE, 0xE6, _GUEST_PORT, 0xF4])
)


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator QEMU is started with, and why it was chosen."""

    name: AccelName
    reason: str


class _UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    )


class _Regs(ctypes.Structure):
    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in (
            *("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"),
            *(f"r{n}" for n in range(8, 16)),
            *("rip", "rflags"),
        )
    )


class _Segment(ctypes.Structure):
    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    )


class _DTable(ctypes.Structure):
    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    )


class _Sregs(ctypes.Structure):
    _fields_ = (
        *((seg, _Segment) for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", _DTable),
        ("idt", _DTable),
        *((reg, ctypes.c_uint64) for reg in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    )


class _RunHeader(ctypes.Structure):
    """The start of ``struct kvm_run`` with the ``io`` member of its exit union."""

    _fields_ = (
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("io_direction", ctypes.c_uint8),
        ("io_size", ctypes.c_uint8),
        ("io_port", ctypes.c_uint16),
        ("io_count", ctypes.c_uint32),
        ("io_data_offset", ctypes.c_uint64),
    )


class _ProbeFailed(Exception):
    pass


def _ioctl(fd: int, name: str, request: int, arg: int | ctypes.Structure = 0) -> int:
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise _ProbeFailed(f"{name}: {exc}") from exc


def _guest_ran(vcpu: int, run: mmap.mmap) -> str | None:
    """Run the vCPU until the guest halts; None when it did what it should."""
    header = _RunHeader.from_buffer(run)
    try:
        started = time.thread_time()  # CPU time, guest time included: immune to preemption
        _ioctl(vcpu, "KVM_RUN", _KVM_RUN)
        spent = time.thread_time() - started
        if header.exit_reason != _KVM_EXIT_IO:
            return f"the test guest's first exit was {header.exit_reason}, not an IO exit"
        value = run[header.io_data_offset]
        if (header.io_direction, header.io_port, value) != (
            _KVM_EXIT_IO_OUT,
            _GUEST_PORT,
            _GUEST_VALUE,
        ):
            return f"the test guest wrote {value:#x} to port {header.io_port:#x}"
        _ioctl(vcpu, "KVM_RUN", _KVM_RUN)
        if header.exit_reason != _KVM_EXIT_HLT:
            return f"the test guest's second exit was {header.exit_reason}, not HLT"
        if spent > _GUEST_CPU_LIMIT_S:
            return (
                f"the test guest was emulated, not run by the CPU ({_GUEST_LOOPS} loops took"
                f" {spent * 1000:.0f} ms of CPU time; hardware needs about 1 ms)"
            )
        return None
    finally:
        del header  # release the buffer export so the mapping can close


def _run_guest(kvm: int) -> str | None:
    # The guest's one page of memory; unmapped only after the VM is gone.
    with mmap.mmap(-1, mmap.PAGESIZE) as mem:
        mem[: len(_GUEST_CODE)] = _GUEST_CODE
        export = ctypes.c_char.from_buffer(mem)
        address = ctypes.addressof(export)
        del export  # the address stays valid while mem is mapped; the export would block close
        vm = _ioctl(kvm, "KVM_CREATE_VM", _KVM_CREATE_VM)
        try:
            region = _UserspaceMemoryRegion(0, 0, _GUEST_ADDR, mmap.PAGESIZE, address)
            _ioctl(vm, "KVM_SET_USER_MEMORY_REGION", _KVM_SET_USER_MEMORY_REGION, region)
            vcpu = _ioctl(vm, "KVM_CREATE_VCPU", _KVM_CREATE_VCPU)
            try:
                return _run_vcpu(kvm, vcpu)
            finally:
                os.close(vcpu)
        finally:
            os.close(vm)


def _run_vcpu(kvm: int, vcpu: int) -> str | None:
    size = _ioctl(kvm, "KVM_GET_VCPU_MMAP_SIZE", _KVM_GET_VCPU_MMAP_SIZE)
    sregs = _Sregs()
    _ioctl(vcpu, "KVM_GET_SREGS", _KVM_GET_SREGS, sregs)
    sregs.cs.base = 0
    sregs.cs.selector = 0
    _ioctl(vcpu, "KVM_SET_SREGS", _KVM_SET_SREGS, sregs)
    regs = _Regs()
    _ioctl(vcpu, "KVM_GET_REGS", _KVM_GET_REGS, regs)
    regs.rip = _GUEST_ADDR
    regs.rflags = 0x2
    _ioctl(vcpu, "KVM_SET_REGS", _KVM_SET_REGS, regs)
    with mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as run:
        return _guest_ran(vcpu, run)


def probe_kvm_here(device: Path = KVM_DEVICE) -> str | None:
    """Run the test guest in this process: None when KVM works, else what failed.

    A broken KVM can hang in ``KVM_RUN``; call ``probe_kvm`` instead, which runs
    this in a child process with a timeout.
    """
    if not device.exists():
        return f"{device} is missing"
    try:
        kvm = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {device} read-write: {exc}"
    try:
        version = fcntl.ioctl(kvm, _KVM_GET_API_VERSION)
        if version != _KVM_API_VERSION:
            return f"KVM_GET_API_VERSION is {version}, not {_KVM_API_VERSION}"
        return _run_guest(kvm)
    except OSError as exc:
        return f"{device} does not answer KVM_GET_API_VERSION: {exc}"
    except _ProbeFailed as exc:
        return f"the test guest did not run ({exc})"
    finally:
        os.close(kvm)


def _probe_in_child(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """``probe_kvm_here`` in a child Python, so that a hung ``KVM_RUN`` cannot hang us."""
    # The child imports this module from the same tree, installed or not.
    src = str(Path(__file__).resolve().parents[3])
    path = [src, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    argv = [sys.executable, "-m", __name__]
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return f"the test guest did not finish within {timeout_s:g} s"
    except OSError as exc:
        return f"cannot start the probe: {exc}"
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        return None if answer["ok"] else str(answer["failure"])
    except (IndexError, ValueError, KeyError, TypeError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the probe failed (exit status {done.returncode}: {tail})"


def _hints(
    sys_module: Path = Path("/sys/module"), cpuinfo: Path = Path("/proc/cpuinfo")
) -> list[str]:
    """Why KVM may not work here, from what the host shows."""
    hints = []
    if (sys_module / "kvm_pvm").exists():
        hints.append("nested PVM backend? kvm_pvm is loaded")
    try:
        flags = {
            flag
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("flags")
            for flag in line.partition(":")[2].split()
        }
    except OSError:
        return hints
    if not flags & {"vmx", "svm"}:
        hints.append("/proc/cpuinfo has no vmx or svm flag")
    return hints


@functools.cache
def probe_kvm() -> str | None:
    """Whether KVM runs a guest here: None when it does, else ``kvm: <what failed>``.

    Probed once per process, in a child process with a timeout.
    """
    failure = _probe_in_child()
    if failure is None:
        return None
    return "; ".join([f"kvm: {failure}", *_hints()])


def choose_accel(setting: AccelSetting, *, probe: Probe | None = None) -> AccelChoice:
    """The accelerator for ``setting``; ``probe`` defaults to the real, cached ``probe_kvm``.

    ``auto`` falls back to TCG with the reason KVM did not work; ``kvm`` raises
    ``InvalidArgument("accel", reason)`` instead.
    """
    if setting == "tcg":
        choice = AccelChoice("tcg", "configured")
    else:
        failure = (probe or probe_kvm)()
        if failure is None:
            choice = AccelChoice("kvm", "KVM ran a test guest at hardware speed")
        elif setting == "kvm":
            raise InvalidArgument("accel", failure)
        else:
            choice = AccelChoice("tcg", failure)
    log.info("accelerator %s (%s)", choice.name, choice.reason)
    return choice


def _main() -> None:
    """The probe child: one JSON line on stdout."""
    failure = probe_kvm_here()
    print(json.dumps({"ok": failure is None, "failure": failure}), flush=True)


if __name__ == "__main__":
    _main()
