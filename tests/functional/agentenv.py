"""A real ``thinvisor host serve`` for functional tests: its own process on a free
loopback port, TLS with its self-signed certificate, an admin and an operator."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from .hostenv import THINVISOR, TestHost

PASSWORD = "correct-horse-battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TestAgent:
    """``thinvisor host serve`` on top of a ``TestHost``'s configuration."""

    __test__ = False

    def __init__(self, host: TestHost):
        self.host = host
        self.port = free_port()
        self.cim_port = free_port()
        self.state_dir = host.config.state_dir
        # Top-level keys go before the first table, the [api] table at the end.
        top, tables = host.config_file.read_text().split("[[datastores]]", 1)
        host.config_file.write_text(
            f"{top}autostart_delay_s = 0.5\n"
            f"[[datastores]]{tables}"
            f'[api]\nlisten = "127.0.0.1"\nport = {self.port}\n'
            f"[cim]\nport = {self.cim_port}\n"
            # KSM is the host's, not one test's: the tests that need it turn it on.
            "[memory]\nksm = false\n"
            # Many agents on one machine: each its own free migration port.
            "[migration]\nport = 0\n"
        )
        self.cim_url = f"https://127.0.0.1:{self.cim_port}"
        self.base = f"https://127.0.0.1:{self.port}/api/v1"
        self.cert = self.state_dir / "tls" / "host.crt"
        self.log = host.root / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        password_file = host.root / "admin.pw"
        password_file.write_text(PASSWORD + "\n")
        host.cli("host", "init", "--user", "admin", "--password-file", str(password_file))
        host.cli("host", "user", "add", "oper", "--role", "operator",
                 "--password-file", str(password_file))  # fmt: skip
        host.cli("host", "user", "add", "viewer", "--role", "read-only",
                 "--password-file", str(password_file))  # fmt: skip

    def start(self) -> None:
        env = {**os.environ, "THINVISOR_CONFIG": str(self.host.config_file)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [THINVISOR, "host", "serve"], env=env, stdout=log, stderr=log,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise AssertionError(f"the agent exited:\n{self.log.read_text()[-3000:]}")
            if self.cert.exists():
                try:
                    with self.client(None) as c:
                        if c.get("/health").status_code == 200:
                            return
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"the agent did not answer:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int | None:
        """SIGTERM, as an init system would; the agent's exit code."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def client(self, user: str | None = "admin", **kwargs: Any) -> httpx.Client:
        """An httpx client that trusts exactly this agent's certificate."""
        auth = (user, PASSWORD) if user else None
        return httpx.Client(
            base_url=self.base, verify=self.ssl_context(), auth=auth, timeout=120, **kwargs
        )

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def ws_url(self, path: str) -> str:
        return f"wss://127.0.0.1:{self.port}/api/v1{path}"

    def wait_task(self, client: httpx.Client, response: httpx.Response) -> dict[str, Any]:
        """Follow a 202's task to its end; the finished task."""
        assert response.status_code == 202, response.text
        task_id = response.json()["id"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            task: dict[str, Any] = client.get(f"/tasks/{task_id}").json()
            if task["state"] in ("success", "error"):
                return task
            time.sleep(0.1)
        raise AssertionError(f"task {task_id} did not finish")

    def close(self) -> None:
        self.stop()


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
