"""Host agents and a center in a lab of network namespaces (``tests.peers.lab``).

Each ``LabAgent`` is a real ``thinvisor host serve`` running inside its own namespace,
answering on its own address on the lab's bridge; the ``LabCenter`` runs ``thinvisor
center serve`` in the lab's own namespace and is driven through its CLI, run in that
namespace too. Nothing here ever sends a packet from the machine's own namespace to a lab
address: the lab is reachable only from inside.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.peers.lab import LabNode, in_namespace
from thinvisor.tls import fingerprint

from .agentenv import PASSWORD, TestAgent
from .hostenv import THINVISOR, TestHost


class LabAgent(TestAgent):
    """A ``TestAgent`` living in ``node``'s namespace, on ``node.address``."""

    __test__ = False

    def __init__(self, host: TestHost, node: LabNode) -> None:
        super().__init__(host)
        self.node = node
        text = host.config_file.read_text()
        host.config_file.write_text(
            text.replace('listen = "127.0.0.1"', f'listen = "{node.address}"')
        )
        self.base = f"https://{node.address}:{self.port}/api/v1"
        self.url = f"https://{node.address}:{self.port}"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    def start(self) -> None:
        env = {**os.environ, "THINVISOR_CONFIG": str(self.host.config_file)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.node.ns.name, THINVISOR, "host", "serve"],
                env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise AssertionError(f"the agent exited:\n{self.log.read_text()[-3000:]}")
            if self.cert.exists() and in_namespace(self.node.ns.name, self._healthy):
                return
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the agent did not answer:\n{self.log.read_text()[-3000:]}")

    def _healthy(self) -> bool:
        try:
            with self.client(None, timeout=2) as c:
                return c.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash would end it (its VMs keep running)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def client(self, user: str | None = "admin", **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 120)
        auth = (user, PASSWORD) if user else None
        return httpx.Client(base_url=self.base, verify=self.ssl_context(), auth=auth, **kwargs)

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cert))
        context.check_hostname = False  # the certificate names the machine, not the lab address
        return context


class LabCenter:
    """``thinvisor center serve`` in the lab's namespace, on SQLite (or ``database_url``)."""

    __test__ = False

    def __init__(self, node: LabNode, *, database_url: str | None = None) -> None:
        self.node = node
        self.root = Path(tempfile.mkdtemp(prefix="tvc", dir="/tmp"))
        self.state_dir = self.root / "state"
        self.port = 9443
        self.url = f"https://{node.address}:{self.port}"
        self.config_file = self.root / "center.toml"
        database = f'[database]\nurl = "{database_url}"\n' if database_url else ""
        self.config_file.write_text(
            f'state_dir = "{self.state_dir}"\n'
            f'[api]\nlisten = "{node.address}"\nport = {self.port}\n'
            # Quick to notice a host gone, quick to try it again.
            "[sync]\nping_interval_s = 1\nping_timeout_s = 2\nreconnect_max_s = 2\n"
            f"{database}"
        )
        self.log = self.root / "center.log"
        self.xdg = self.root / "xdg"
        self.password_file = self.root / "admin.pw"
        self.password_file.write_text(PASSWORD + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.cli("init", "--user", "admin", "--password-file", str(self.password_file))

    def env(self, user: str = "admin") -> dict[str, str]:
        """The CLI's environment; each user keeps their own login."""
        return {
            **os.environ,
            "THINVISOR_CENTER_CONFIG": str(self.config_file),
            "XDG_CONFIG_HOME": str(self.xdg / user),
        }

    def cli(
        self,
        *args: str,
        code: int = 0,
        user: str = "admin",
        input: str | None = None,
        timeout: float = 240,
    ) -> str:
        """``thinvisor center ARGS`` run in the lab's namespace as ``user`` (once logged
        in); its stdout, or its stderr when it was to fail with ``code``."""
        proc = subprocess.run(
            ["ip", "netns", "exec", self.node.ns.name, THINVISOR, "center", *args],
            env=self.env(user), input=input, capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip
        assert proc.returncode == code, (
            f"thinvisor center {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
            f"\n--- the center's log:\n{self.log.read_text(errors='replace')[-3000:]}"
        )
        return proc.stderr if code else proc.stdout

    def json(self, *args: str, user: str = "admin") -> Any:
        return json.loads(self.cli(*args, "--json", user=user))

    def login(self, user: str = "admin") -> None:
        """Log ``user`` (password ``PASSWORD``) in, the center's certificate pinned."""
        pinned = fingerprint(self.state_dir / "tls" / "center.crt")
        self.cli("login", self.url, "--user", user, "--password-file", str(self.password_file),
                 "--fingerprint", pinned, user=user)  # fmt: skip

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.node.ns.name, THINVISOR, "center", "serve"],
                env=self.env(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        cert = self.state_dir / "tls" / "center.crt"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise AssertionError(f"the center exited:\n{self.log.read_text()[-3000:]}")
            if cert.exists() and in_namespace(self.node.ns.name, self._healthy):
                return
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the center did not answer:\n{self.log.read_text()[-3000:]}")

    def _healthy(self) -> bool:
        try:
            with httpx.Client(verify=False, timeout=2) as c:  # a probe of its health only
                return c.get(f"{self.url}/api/v1/health").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
