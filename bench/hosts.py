"""The contenders' hosts: a throwaway thinvisor host with its agent, libvirtd started by
hand, and QEMU run directly. Each cleans up after itself: no process, domain or file is
left behind, whatever happens in between."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.harness import wait_until
from thinvisor.appliance import Appliance, build_appliance
from thinvisor.config import load_config
from thinvisor.host.engine.process import kill, running_pid
from thinvisor.host.inventory import Inventory
from thinvisor.host.resources import ResourceControls

READY = b"THINVISOR-APPLIANCE-READY uptime="
THINVISOR = str(Path(sys.executable).with_name("thinvisor"))
APPLIANCE_CACHE = Path(os.environ.get("THINVISOR_BENCH_CACHE", "/var/cache/thinvisor"))
USER = "bench"


def appliance() -> Appliance:
    """The quick-start appliance, from the cache thinvisor itself uses."""
    return build_appliance(APPLIANCE_CACHE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def log_size(log: Path) -> int:
    """How long a log is now: where the next boot's lines will start."""
    try:
        return log.stat().st_size
    except FileNotFoundError:
        return 0


def ready_uptime(log: Path, offset: int = 0) -> float | None:
    """The guest's uptime on the appliance's ready line, once the line is there (in the
    part of ``log`` from ``offset`` on: serial logs are appended to boot after boot)."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return None
    at = data.find(READY)
    if at < 0:
        return None
    end = data.find(b"\n", at)
    if end < 0:
        return None
    return float(data[at + len(READY) : end].strip())


def gone(pid: int) -> bool:
    """Whether a process has ended: no longer there, or a zombie not yet reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def reaped(pid: int) -> bool:
    """Whether a process has ended and been reaped by its parent."""
    return not Path(f"/proc/{pid}").exists()


def rss_kib(pid: int) -> int:
    """A process's resident set size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class ThinvisorHost:
    """A thinvisor host in a temporary directory and its agent, ``thinvisor host serve``."""

    def __init__(self, name: str = "bench") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tvb", dir="/tmp"))
        self.port = free_port()
        self.cim_port = free_port()
        self.password = secrets.token_urlsafe(16)
        self.config_file = self.root / "host.toml"
        self.datastore = self.root / "ds"
        self.datastore.mkdir()
        self.config_file.write_text(
            f'run_dir = "{self.root / "run"}"\n'
            f'cache_dir = "{APPLIANCE_CACHE}"\n'
            f'state_dir = "{self.root / "state"}"\n'
            "autostart_delay_s = 0\n"
            f'[[datastores]]\nname = "local"\npath = "{self.datastore}"\n'
            f'[api]\nlisten = "127.0.0.1"\nport = {self.port}\n'
            f"[cim]\nport = {self.cim_port}\n"
            # The density benchmark turns KSM off and on itself.
            "[memory]\nksm = false\n"
        )
        self.env = {**os.environ, "THINVISOR_CONFIG": str(self.config_file)}
        self.base = f"https://127.0.0.1:{self.port}/api/v1"
        self.cert = self.root / "state" / "tls" / "host.crt"
        self.log = self.root / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._token: str | None = None
        pw = self.root / "pw"
        pw.write_text(self.password + "\n")
        try:
            self._cli("host", "init", "--user", USER, "--password-file", str(pw))
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _cli(self, *args: str) -> str:
        out = subprocess.run(
            [THINVISOR, *args], env=self.env, capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"thinvisor {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [THINVISOR, "host", "serve"],
                env=self.env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited: {self.log.read_text()[-2000:]}")
            if not self.cert.exists():
                return False
            try:
                with self.client() as c:
                    return c.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, 60, "the agent's health", poll=0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(
            base_url=self.base,
            verify=self.ssl_context(),
            auth=(USER, self.password),
            timeout=120,
            **kwargs,
        )

    def token_client(self, **kwargs: Any) -> httpx.Client:
        """A client that sends an API token, as ``thinvisor login`` leaves the CLI with
        (HTTP Basic costs an argon2id hash on every request)."""
        if self._token is None:
            with self.client() as basic:
                body = {"user": USER, "password": self.password, "label": "bench"}
                response = basic.post("/auth/login", json=body)
                response.raise_for_status()
                self._token = str(response.json()["token"])
        return httpx.Client(
            base_url=self.base,
            verify=self.ssl_context(),
            headers={"Authorization": f"Bearer {self._token}"},
            timeout=120,
            **kwargs,
        )

    def wait_task(self, client: httpx.Client, response: httpx.Response) -> dict[str, Any]:
        """Follow a 202's task to its end; the finished task (an error raises)."""
        if response.status_code != 202:
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return {"state": "success", "result": result}
        task_id = response.json()["id"]

        def finished() -> dict[str, Any] | None:
            task: dict[str, Any] = client.get(f"/tasks/{task_id}").json()
            return task if task["state"] in ("success", "error") else None

        task = wait_until(finished, 300, f"task {task_id}", poll=0.01)
        if task["state"] == "error":
            raise RuntimeError(f"task {task_id}: {task['error']}")
        return task

    def vm_dir(self, name: str) -> Path:
        return self.datastore / name

    def serial_log(self, name: str) -> Path:
        return self.vm_dir(name) / "logs" / "serial0.log"

    def qemu_pid(self, name: str) -> int | None:
        config = load_config(self.config_file)
        return running_pid(Inventory(config).get(name).paths)

    def close(self) -> None:
        """End every QEMU of this host and its agent, and remove its files."""
        with contextlib.suppress(Exception):
            config = load_config(self.config_file)
            controls = ResourceControls(lambda: 0)  # removing needs no clock
            for entry in Inventory(config).entries():
                pid = running_pid(entry.paths)
                if pid is not None:
                    kill(pid)
                    # Not reaped yet counts as gone: QEMU's parent is init, not us.
                    with contextlib.suppress(TimeoutError):
                        wait_until(lambda p=pid: gone(p), 10, "QEMU gone")
                # Ended here, not by the agent: its cgroups are ours to remove, once QEMU
                # is reaped (until then the cgroup still counts it).
                if entry.spec is not None:
                    if pid is not None:
                        with contextlib.suppress(TimeoutError):
                            wait_until(lambda p=pid: reaped(p), 10, "QEMU reaped")
                    controls.release(entry.spec)
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThinvisorHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
