"""Power-on to ready and power-off to gone: thinvisor, libvirt and QEMU started by hand.

The same appliance VM for all three (128 MiB, one vCPU, q35, headless, a serial console
logged to a file), defined once and then powered on and off round after round:

- thinvisor: ``POST /vms/{vm}/start`` on its REST API, ``POST /vms/{vm}/stop`` (a hard
  power off: QMP ``quit``);
- libvirt: ``dom.create()`` on a defined domain, ``dom.destroy()`` (SIGTERM, then SIGKILL);
- QEMU by hand: exec of the command line thinvisor builds for the same spec, ``kill``
  (SIGTERM) and ``wait``.

Power-on is timed from the request to its return, and to the ready line on the serial
console; the guest's own uptime on that line shows that the guests booted alike.
Power-off is timed from the request until the QEMU process has exited, and until the
request returns.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.harness import Comparison, Round, alternate, wait_until
from bench.hosts import ThinvisorHost, gone, log_size, ready_uptime
from bench.libvirt_host import LibvirtHost, LibvirtVm
from bench.raw_qemu import RawQemu
from thinvisor.config import load_config
from thinvisor.host.inventory import Inventory

VM = "power"
MEMORY_MIB = 128
MACHINE = "q35"
READY_TIMEOUT_S = 120.0
GONE_TIMEOUT_S = 60.0

COMPARISONS = {
    "on_return": ("power-on: until the request returns", "s"),
    "on_ready": ("power-on to ready: until the ready line", "s"),
    "on_uptime": ("power-on: guest uptime at the ready line (the control)", "s"),
    "on_host": ("power-on: host side (to ready minus guest uptime)", "s"),
    "off_exit": ("power-off to gone: until QEMU has exited", "s"),
    "off_return": ("power-off: until the request returns", "s"),
}
NOTES = {
    "on_return": [
        "thinvisor: POST /vms/{vm}/start returns once QEMU serves QMP; libvirt: "
        "dom.create() returns once QEMU runs its vCPUs; qemu: until the exec returns "
        "(fork and exec only, the spawn time)"
    ],
    "on_ready": ["from the request until THINVISOR-APPLIANCE-READY is in the serial log"],
    "on_uptime": ["the guest kernel's own clock, from its start to the ready line"],
    "on_host": [
        "what the guest's clock does not see: the manager, QEMU's start, SeaBIOS and "
        "the kernel's loading and decompression"
    ],
    "off_exit": [
        "thinvisor: POST /vms/{vm}/stop (QMP quit); libvirt: dom.destroy() (SIGTERM); "
        "qemu: kill (SIGTERM) and wait; until the QEMU process has exited (a zombie "
        "not yet reaped by its parent counts as exited)"
    ],
    "off_return": [
        "libvirt's destroy() waits until the process is reaped; its QEMU's parent is "
        "init, which on this machine reaps orphans only every ~2 s"
    ],
}


def run(log: Callable[[str], None], rounds: int) -> list[Comparison]:
    """Power on and off, thinvisor, libvirt and QEMU by hand in turn, ``rounds`` times."""
    comparisons = {m: Comparison(t, m, u) for m, (t, u) in COMPARISONS.items()}
    for metric, notes in NOTES.items():
        comparisons[metric].notes += notes
    with contextlib.ExitStack() as stack:
        log("power: starting a thinvisor host")
        host = stack.enter_context(ThinvisorHost("power"))
        host.start()
        client = stack.enter_context(host.token_client())
        contenders = {"thinvisor": thinvisor_round(host, client, define_vm(host, client))}
        spec = Inventory(load_config(host.config_file)).get_valid(VM)[1]
        raw = stack.enter_context(RawQemu(spec, host.vm_dir(VM)))
        peer = open_libvirt(stack, log)
        if isinstance(peer, str):
            for comparison in comparisons.values():
                comparison.notes.append(peer)
        else:
            contenders["libvirt"] = libvirt_round(*peer)
        contenders["qemu"] = raw_round(raw)
        log(f"power: {', '.join(contenders)}; {rounds} rounds after a warm-up")
        alternate(contenders, comparisons, rounds=rounds, log=log)
    return list(comparisons.values())


def define_vm(host: ThinvisorHost, client: httpx.Client) -> str:
    """The benchmark's VM on thinvisor: the appliance, headless."""
    body = {
        "name": VM,
        "memory_mib": MEMORY_MIB,
        "vcpus": 1,
        "machine": MACHINE,
        "appliance": True,
        "graphics": {"kind": "none"},
    }
    host.wait_task(client, client.post("/vms", json=body))
    return VM


def open_libvirt(
    stack: contextlib.ExitStack, log: Callable[[str], None]
) -> tuple[LibvirtHost, LibvirtVm] | str:
    """libvirtd started by hand with the same VM defined, or why it cannot run here."""
    try:
        libvirt_host = stack.enter_context(LibvirtHost())
        log("power: starting libvirtd")
        libvirt_host.start()
        vm = libvirt_host.define_appliance(VM, memory_mib=MEMORY_MIB, machine=MACHINE)
    except Exception as exc:  # the run goes on without this peer, and says why
        log(f"power: no libvirt: {exc}")
        return f"libvirt could not be started: {exc}"
    return libvirt_host, vm


def wait_ready(serial: Path, offset: int, started: float, pid: int) -> tuple[float, float]:
    """Seconds from ``started`` to the ready line, and the guest's uptime on it; fails at
    once if QEMU ends first."""

    def ready() -> float | None:
        uptime = ready_uptime(serial, offset)
        if uptime is None and gone(pid):
            raise RuntimeError(f"QEMU (pid {pid}) ended before the ready line in {serial}")
        return uptime

    uptime = wait_until(ready, READY_TIMEOUT_S, f"the ready line in {serial}")
    return time.monotonic() - started, float(uptime)


def power_off(request: Callable[[], object], pid: int) -> tuple[float, float]:
    """Run ``request`` (it blocks) while watching QEMU: the seconds until QEMU has
    exited, and until the request returned."""
    returned: list[float] = []
    failed: list[BaseException] = []
    started = time.monotonic()

    def call() -> None:
        try:
            request()
            returned.append(time.monotonic() - started)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=call, name="power-off")
    thread.start()
    try:
        wait_until(lambda: gone(pid) or failed, GONE_TIMEOUT_S, f"QEMU (pid {pid}) gone")
        exited = time.monotonic() - started
    finally:
        thread.join()
    if failed:
        raise failed[0]
    return exited, returned[0]


def thinvisor_round(host: ThinvisorHost, client: httpx.Client, vm: str) -> Round:
    serial = host.serial_log(vm)

    def one() -> dict[str, float]:
        offset = log_size(serial)
        started = time.monotonic()
        response = client.post(f"/vms/{vm}/start")
        returned = time.monotonic() - started
        response.raise_for_status()
        pid = response.json().get("pid") or host.qemu_pid(vm)
        ready, uptime = wait_ready(serial, offset, started, pid)
        exited, off = power_off(lambda: client.post(f"/vms/{vm}/stop").raise_for_status(), pid)
        return {"on_return": returned, "on_ready": ready, "on_uptime": uptime,
                "on_host": ready - uptime, "off_exit": exited, "off_return": off}  # fmt: skip

    return one


def libvirt_round(libvirt_host: LibvirtHost, vm: LibvirtVm) -> Round:
    def one() -> dict[str, float]:
        offset = log_size(vm.serial_log)
        started = time.monotonic()
        vm.domain.create()
        returned = time.monotonic() - started
        pid = libvirt_host.qemu_pid(vm.name)
        ready, uptime = wait_ready(vm.serial_log, offset, started, pid)
        exited, off = power_off(vm.domain.destroy, pid)
        return {"on_return": returned, "on_ready": ready, "on_uptime": uptime,
                "on_host": ready - uptime, "off_exit": exited, "off_return": off}  # fmt: skip

    return one


def raw_round(raw: RawQemu) -> Round:
    def one() -> dict[str, float]:
        offset = log_size(raw.serial_log)
        started = time.monotonic()
        spawned = raw.start()
        ready, uptime = wait_ready(raw.serial_log, offset, started, raw.pid)
        exited, off = power_off(raw.stop, raw.pid)
        return {"on_return": spawned, "on_ready": ready, "on_uptime": uptime,
                "on_host": ready - uptime, "off_exit": exited, "off_return": off}  # fmt: skip

    return one
