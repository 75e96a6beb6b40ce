"""``make demo``: build the appliance, create and start the VM ``demo``, show its console.

Run again, it reuses what is there: the appliance cache, the VM, a running QEMU.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time

from thinvisor.appliance import Appliance, build_appliance
from thinvisor.config import load_config
from thinvisor.errors import ThinvisorError
from thinvisor.fs import tail
from thinvisor.host.service import CreateOptions, HostService, NewDisk, VmInfo
from thinvisor.model import VmSpec

NAME = "demo"
READY = re.compile(rb"THINVISOR-APPLIANCE-READY uptime=([0-9.]+)")
# Terminal control sequences (the guest shell asks the terminal for its size).
CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def ensure_vm(service: HostService, image: Appliance) -> VmInfo:
    if service.inventory.find(NAME) is not None:
        return await service.get_vm(NAME)
    spec = VmSpec.model_validate(
        {
            "name": NAME,
            "memory_mib": 128,
            "vcpus": 1,
            "boot": {
                "kind": "kernel",
                "kernel": "vmlinuz",
                "initrd": "initrd.img",
                "cmdline": image.cmdline,
            },
            "cdrom": {"bus": "scsi"},
        }
    )
    spec = spec.model_copy(update={"nics": [service.new_nic(spec)]})
    options = CreateOptions(
        kernel_source=image.kernel, initrd_source=image.initrd, new_disks=[NewDisk(size=1 << 30)]
    )
    say(f"creating VM {NAME!r}")
    return await service.create_vm(VmSpec.model_validate(spec.model_dump()), options)


async def wait_ready(info: VmInfo, offset: int, timeout: float = 120.0) -> bytes:
    log = info.paths.serial_log("serial0")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        size = log.stat().st_size if log.exists() else 0
        data = tail(log, max(0, size - offset)) if size > offset else b""
        if READY.search(data):
            return data
        await asyncio.sleep(0.2)
    raise ThinvisorError(f"the demo VM did not print its ready line within {timeout:.0f} s")


async def demo() -> None:
    service = HostService(load_config())
    say("building the quick-start appliance (cached after the first run)")
    image = build_appliance(service.config.cache_dir, progress=lambda m: say(f"  {m}"))
    info = await ensure_vm(service, image)
    log = info.paths.serial_log("serial0")
    offset = 0
    if info.state in ("stopped", "suspended"):
        offset = log.stat().st_size if log.exists() else 0
        say(f"starting VM {NAME!r} ({service.accel().name})")
        info = await service.start(NAME)
    elif info.state == "paused":
        info = await service.resume(NAME)
    console = await wait_ready(info, offset)
    say(f"\nVM {NAME!r} is {info.state}. Its serial console said:\n")
    text = CONTROL.sub("", console.decode(errors="replace"))
    for line in text.splitlines()[-15:]:
        say(f"  | {line.rstrip()}")
    thinvisor = ".venv/bin/thinvisor"
    say(
        f"\nNext:\n"
        f"  {thinvisor} vm list\n"
        f"  {thinvisor} vm console {NAME}      # attach; detach with Ctrl-]\n"
        f"  {thinvisor} vm shutdown {NAME}     # ACPI power button; 'vm stop' pulls the plug\n"
        f"  {thinvisor} vm delete {NAME}\n"
    )


def main() -> int:
    try:
        asyncio.run(demo())
    except ThinvisorError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
