"""A throwaway thinvisor host for functional tests: its own datastore, run directory and
configuration file, the shared appliance cache, and a teardown that ends every QEMU it
started (by pid) and removes everything."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from thinvisor.appliance import Appliance
from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.console.serial import SerialConsole
from thinvisor.host.engine.process import kill, running_pid
from thinvisor.host.inventory import Inventory
from thinvisor.host.service import CreateOptions, HostService, NewDisk, VmInfo
from thinvisor.model import VmSpec

READY = re.compile(rb"THINVISOR-APPLIANCE-READY uptime=([0-9.]+)")
THINVISOR = str(Path(sys.executable).with_name("thinvisor"))


class TestHost:
    """One thinvisor host in a short temporary directory (unix sockets need short paths)."""

    __test__ = False

    def __init__(self, appliance: Appliance):
        self.root = Path(tempfile.mkdtemp(prefix="tv", dir="/tmp"))
        self.appliance = appliance
        self.config = HostConfig(
            run_dir=self.root / "run",
            state_dir=self.root / "state",
            cache_dir=appliance.kernel.parents[2],
            datastores=[DatastoreConfig(name="local", path=self.root / "ds")],
            shutdown_timeout_s=60,
        )
        self.config_file = self.root / "host.toml"
        self.config_file.write_text(
            f'run_dir = "{self.config.run_dir}"\n'
            f'cache_dir = "{self.config.cache_dir}"\n'
            f'state_dir = "{self.config.state_dir}"\n'
            f'[[datastores]]\nname = "local"\npath = "{self.root / "ds"}"\n'
        )
        self.datastore = self.root / "ds"
        self.datastore.mkdir()
        self.service = HostService(self.config)

    def add_datastore(self, name: str, path: Path) -> None:
        """One more datastore in host.toml (another host's too, when they share it)."""
        with self.config_file.open("a") as f:
            f.write(f'[[datastores]]\nname = "{name}"\npath = "{path}"\n')
        data = self.config.model_dump()
        data["datastores"].append({"name": name, "path": path})
        self.config = HostConfig.model_validate(data)
        self.service = HostService(self.config)

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)

    def cli(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``thinvisor`` command against this host: a new process each time."""
        # Its own XDG_CONFIG_HOME: a login of the person running the tests must not apply.
        env = {
            **os.environ,
            "THINVISOR_CONFIG": str(self.config_file),
            "XDG_CONFIG_HOME": str(self.root / "xdg"),
        }
        proc = subprocess.run(
            [THINVISOR, *args],
            check=False,
            env=env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"thinvisor {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def show(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.cli("vm", "show", name, "--json").stdout)
        return data

    def create(
        self,
        name: str = "vm1",
        *,
        start: bool = True,
        disk_mib: int = 0,
        datastore: str | None = None,
        **fields: Any,
    ) -> VmInfo:
        """An appliance VM created through the service, started unless told not to."""
        spec = VmSpec.model_validate(
            {
                "name": name,
                "memory_mib": 128,
                "boot": {
                    "kind": "kernel",
                    "kernel": "vmlinuz",
                    "initrd": "initrd.img",
                    "cmdline": self.appliance.cmdline,
                },
                "cdrom": {"bus": "scsi"},
                **fields,
            }
        )
        options = CreateOptions(
            datastore=datastore,
            kernel_source=self.appliance.kernel,
            initrd_source=self.appliance.initrd,
            new_disks=[NewDisk(size=disk_mib << 20)] if disk_mib else [],
        )
        info: VmInfo = self.run(self.service.create_vm(spec, options))
        if start:
            info = self.run(self.service.start(name))
        return info

    def serial_log(self, name: str) -> bytes:
        log = Inventory(self.config).get(name).paths.serial_log("serial0")
        return log.read_bytes() if log.exists() else b""

    def wait_for(self, name: str, pattern: bytes, count: int = 1, timeout: float = 120) -> bytes:
        """Wait until the serial log shows ``pattern`` at least ``count`` times."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.serial_log(name)
            if len(re.findall(pattern, log)) >= count:
                return log
            time.sleep(0.1)
        tail = self.serial_log(name)[-2000:].decode(errors="replace")
        raise AssertionError(f"{pattern!r} x{count} not seen on {name}'s console:\n{tail}")

    def wait_ready(self, name: str, count: int = 1) -> bytes:
        return self.wait_for(name, READY.pattern, count)

    def guest(self, name: str, command: str, timeout: float = 60) -> tuple[int, str]:
        """Run a shell command in the guest over its serial console: status, output."""
        sock = Inventory(self.config).get(name).paths.serial_socket("serial0")

        async def go() -> tuple[int, str]:
            async with SerialConsole(sock) as console:
                return await console.run(command, timeout)

        result: tuple[int, str] = self.run(go())
        return result

    def sh(self, name: str, command: str, timeout: float = 60) -> str:
        """``guest`` for a command that must succeed; its output."""
        status, out = self.guest(name, command, timeout)
        assert status == 0, f"{command!r} failed in the guest {name}: {out}"
        return out

    def pid(self, name: str) -> int | None:
        return running_pid(Inventory(self.config).get(name).paths)

    def close(self) -> None:
        """End every QEMU this host started, then remove its cgroups and files."""
        for entry in Inventory(self.config).entries():
            pid = running_pid(entry.paths)
            if pid is not None:
                kill(pid)
                deadline = time.monotonic() + 10
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            if entry.spec is not None:  # its cgroups, once QEMU has left them
                self.service.controls.release(entry.spec)
        shutil.rmtree(self.root, ignore_errors=True)
