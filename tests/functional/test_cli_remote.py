"""The ``thinvisor`` command against a real host agent: ``login``, then every ``vm`` command
over the REST API (and the console over its WebSocket), then ``logout``."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from thinvisor.tls import fingerprint

from .agentenv import PASSWORD, TestAgent
from .hostenv import THINVISOR, TestHost

pytestmark = pytest.mark.functional


class Cli:
    """The real ``thinvisor`` with its login in the test's own XDG_CONFIG_HOME, and no
    host configuration: logged in, it needs none."""

    def __init__(self, host: TestHost):
        self.host = host
        self.xdg = host.root / "xdg"
        self.login_file = self.xdg / "thinvisor" / "login.json"

    def __call__(
        self, *args: str, code: int = 0, input: str | None = None, local: bool = False
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "THINVISOR_LOCAL"}
        env["XDG_CONFIG_HOME"] = str(self.xdg)
        # Remotely the local host's configuration must not matter: point it nowhere.
        env["THINVISOR_CONFIG"] = str(self.host.config_file if local else "/nonexistent.toml")
        proc = subprocess.run(
            [THINVISOR, *args],
            check=False,
            env=env,
            input=input,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == code, f"thinvisor {' '.join(args)}: {proc.stderr.strip()}"
        return proc

    def error(self, *args: str) -> str:
        err = self(*args, code=1).stderr
        assert err.count("\n") == 1 and err.startswith("error: "), err
        return err.removeprefix("error: ").rstrip("\n")


def log_in(cli: Cli, agent: TestAgent) -> None:
    password_file = agent.host.root / "login.pw"
    password_file.write_text(PASSWORD + "\n")
    url = f"https://127.0.0.1:{agent.port}"
    out = cli("login", url, "--user", "admin", "--password-file", str(password_file), "--yes")
    assert fingerprint(agent.cert) in out.stderr
    stored = json.loads(cli.login_file.read_text())
    assert stored["url"] == url and stored["user"] == "admin" and stored["token"]
    assert stored["fingerprint"] == fingerprint(agent.cert)
    assert cli.login_file.stat().st_mode & 0o777 == 0o600


def listed(cli: Cli) -> dict[str, str]:
    return {v["name"]: v["state"] for v in json.loads(cli("vm", "list", "--json").stdout)}


def test_vm_commands_over_the_api(host: TestHost, agent: TestAgent) -> None:
    cli = Cli(host)
    log_in(cli, agent)
    created = json.loads(
        cli("vm", "create", "x", "--appliance", "--memory", "128", "--start", "--json").stdout
    )
    assert created["state"] == "running"
    assert created["vm_dir"] == str(host.datastore / "x")
    assert listed(cli) == {"x": "running"}
    host.wait_ready("x")

    out = cli("vm", "console", "x", input="echo remote-$((6*7))\n").stdout
    assert "remote-42" in out
    history = cli("vm", "console", "x", "--history", "3", input="").stdout
    assert "THINVISOR-APPLIANCE-READY" in history or "remote-42" in history

    assert cli("vm", "suspend", "x").stdout == "x: suspended\n"
    assert (host.datastore / "x" / "suspend.state").exists()
    assert cli("vm", "resume", "x").stdout == "x: running\n"
    assert cli("vm", "console", "x", input="echo back-$((6*7))\n").stdout.count("back-42")
    assert cli("vm", "stop", "x").stdout == "x: stopped\n"
    assert cli.error("vm", "pause", "x") == "vm 'x': cannot pause while stopped"
    assert cli.error("vm", "show", "ghost") == "vm 'ghost' does not exist"
    assert cli("vm", "delete", "x").stdout == "x: deleted\n"
    assert listed(cli) == {}
    assert not (host.datastore / "x").exists()


def test_disks_and_creation_options_over_the_api(host: TestHost, agent: TestAgent) -> None:
    cli = Cli(host)
    log_in(cli, agent)
    shown = json.loads(
        cli("vm", "create", "d", "--memory", "64", "--disk", "16M", "--no-nic", "--json").stdout
    )
    assert [d["name"] for d in shown["spec"]["disks"]] == ["disk0"]
    assert shown["spec"]["nics"] == [] and shown["spec"]["cdrom"] == {"path": None, "bus": "ide"}
    assert "added disk1" in cli("vm", "disk", "add", "d", "--size", "8M").stdout
    assert "disk1 is now 16M" in cli("vm", "disk", "resize", "d", "disk1", "16M").stdout
    assert cli.error("vm", "disk", "resize", "d", "disk1", "+8M").startswith("size: ")
    assert cli("vm", "disk", "remove", "d", "disk1").stdout == "d: removed disk1\n"
    assert cli.error("vm", "create", "d") == "vm 'd' already exists"
    assert cli.error("vm", "create", "e", "--nic", "dmz") == (
        "nics.net0.network: no port group 'dmz' on this host"
    )
    cli("vm", "delete", "d")


def test_a_changed_certificate_is_refused(host: TestHost, agent: TestAgent) -> None:
    cli = Cli(host)
    log_in(cli, agent)
    stored = json.loads(cli.login_file.read_text())
    cli.login_file.write_text(json.dumps({**stored, "fingerprint": ":".join(["AB"] * 32)}))
    err = cli.error("vm", "list")
    assert "certificate has changed" in err and fingerprint(agent.cert) in err
    assert "thinvisor login" in err


def test_logout_returns_to_the_local_host(host: TestHost, agent: TestAgent) -> None:
    cli = Cli(host)
    log_in(cli, agent)
    cli("vm", "create", "far", "--memory", "64", "--no-nic")
    # THINVISOR_LOCAL=1 goes to the local host while logged in; this one is the same host.
    assert "far" in cli("vm", "list", local=True).stdout
    agent.stop()
    assert cli.error("vm", "list").startswith(f"cannot reach https://127.0.0.1:{agent.port}")
    assert "logged out" in cli("logout").stdout
    assert not cli.login_file.exists()
    assert listed_locally(cli) == {"far": "stopped"}
    assert "not logged in" in cli("logout").stdout


def listed_locally(cli: Cli) -> dict[str, str]:
    out = cli("vm", "list", "--json", local=True).stdout
    return {v["name"]: v["state"] for v in json.loads(out)}


def test_wrong_password_and_unconfirmed_certificate(host: TestHost, agent: TestAgent) -> None:
    cli = Cli(host)
    url = f"https://127.0.0.1:{agent.port}"
    wrong = host.root / "wrong.pw"
    wrong.write_text("nope\n")
    # The fingerprint is shown first, then the error is one line.
    proc = cli("login", url, "--user", "admin", "--password-file", str(wrong), "--yes", code=1)
    assert proc.stderr.endswith("\nerror: wrong user name or password\n")
    # Without --yes the fingerprint is asked about; "n" refuses before any password is sent.
    proc = cli("login", url, "--user", "admin", "--password-file", str(wrong), code=1, input="n\n")
    assert fingerprint(agent.cert) in proc.stderr
    assert proc.stderr.endswith("error: not logged in: the certificate was not trusted\n")
    assert not cli.login_file.exists()
