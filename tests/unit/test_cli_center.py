"""``thinvisor center``: the CLI against a real center.

One ``thinvisor center serve`` process (TLS, SQLite in ``tmp_path``) for the server
itself: logging in pins its certificate, SIGTERM stops it, a database it cannot reach
stops it with one line. The commands on hosts and VMs run against a center served
in-process (a thread of this test, so that the fake provider's hosts, which live in this
process, are the ones it manages).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import uvicorn
from argon2 import PasswordHasher
from rich.text import Text
from typer.testing import CliRunner
from websockets.sync.server import ServerConnection, serve

from thinvisor.auth import Role, UserStore
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api.app import create_center_app
from thinvisor.center.config import CenterApiConfig, CenterConfig
from thinvisor.center.db import open_database
from thinvisor.center.inventory import Inventory
from thinvisor.center.permissions import Permissions
from thinvisor.center.secrets import SecretBox
from thinvisor.cli import center as center_cli
from thinvisor.cli import center_vm
from thinvisor.cli.center import normal_fingerprint
from thinvisor.cli.center_client import CenterClient, center_url
from thinvisor.cli.center_vm import serial_target
from thinvisor.cli.main import app
from thinvisor.cli.remote import Login, pinned_context, save_login
from thinvisor.errors import InvalidArgument, NotFound
from thinvisor.providers.base import PowerState
from thinvisor.providers.fake import FakeHost, fake_host, remove_fake_host
from thinvisor.tls import ensure_certificate, fingerprint

from .clienv import tv

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "password123"
HOST_FINGERPRINT = ":".join(["5A"] * 32)
THINVISOR = str(Path(sys.executable).with_name("thinvisor"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(tmp_path: Path, port: int, database: str | None = None) -> Path:
    config = tmp_path / "center.toml"
    text = f'state_dir = "{tmp_path / "state"}"\n[api]\nlisten = "127.0.0.1"\nport = {port}\n'
    if database is not None:
        text += f'[database]\nurl = "{database}"\n'
    config.write_text(text)
    return config


# --- parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("center.example", "https://center.example:9443"),
        ("10.0.0.5:9000", "https://10.0.0.5:9000"),
        ("https://c:9443/api/v1", "https://c:9443"),
        ("http://c", "http://c"),
        ("[::1]", "https://[::1]:9443"),
    ],
)
def test_center_urls(text: str, url: str) -> None:
    assert center_url(text) == url


def test_fingerprints_in_any_spelling() -> None:
    colons = ":".join(["AB"] * 32)
    assert normal_fingerprint("ab" * 32) == colons
    assert normal_fingerprint(colons.lower()) == colons
    with pytest.raises(InvalidArgument, match="fingerprint: 'AB:CD' is not a SHA-256"):
        normal_fingerprint("AB:CD")


# --- the server process ---------------------------------------------------------------


def wait_healthy(url: str, fp: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    with httpx.Client(verify=pinned_context(fp), trust_env=False) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the center exited"
            try:
                if client.get(f"{url}/api/v1/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
    raise AssertionError("the center did not answer")


def test_serve_login_and_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    env = {"THINVISOR_CENTER_CONFIG": str(config), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    out = tv(env, "center", "init", "--user", "root", "--password-file", str(tmp_path / "pw"))
    assert out.startswith("created admin user 'root'")
    log = (tmp_path / "center.log").open("wb")
    proc = subprocess.Popen(
        [THINVISOR, "center", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )
    try:
        url = f"https://127.0.0.1:{port}"
        for _ in range(300):
            if (tmp_path / "state" / "tls" / "center.crt").exists():
                break
            time.sleep(0.05)
        fp = fingerprint(tmp_path / "state" / "tls" / "center.crt")
        wait_healthy(url, fp, proc)
        login = ["center", "login", url, "--user", "root", "--password-file", str(tmp_path / "pw")]
        refused = tv(env, *login, "--fingerprint", HOST_FINGERPRINT, code=1)
        assert (
            refused == f"error: fingerprint: {url} presented a certificate with fingerprint {fp}\n"
        )
        assert tv(env, *login, "--fingerprint", fp.replace(":", "").lower()).startswith(
            f"logged in to {url} as root (admin)"
        )
        saved = json.loads((tmp_path / "xdg" / "thinvisor" / "center-login.json").read_text())
        assert (saved["url"], saved["fingerprint"]) == (url, fp)
        info = json.loads(tv(env, "center", "info", "--json"))
        assert (info["tls_fingerprint"], info["database"]) == (fp, "sqlite")
        assert tv(env, "center", "datacenter", "create", "dc1") == "created datacenter /dc1\n"
        # Fake hosts live in the process that made them: this center has none.
        error = tv(env, "center", "host", "add", "fake://x", "--provider", "fake",
                   "--parent", "/dc1", code=1)  # fmt: skip
        assert error.startswith("error: address: cannot connect: fake://x: no answer")
        assert error.count("\n") == 1
        proc.send_signal(signal.SIGTERM)
        # uvicorn stops gracefully, then dies of the signal it caught, as daemons do.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "center.log").read_text()
    assert f"TLS certificate SHA-256 fingerprint: {fp}" in text
    # Stopped gracefully: the agent said so in its event log.
    events = (tmp_path / "state" / "events.jsonl").read_text()
    assert '"kind":"center.stopped"' in events


def test_a_database_that_cannot_be_reached_stops_serve_with_one_line(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, free_port(), f"postgresql://tv:secret@127.0.0.1:{free_port()}/tv"
    )
    result = subprocess.run(
        [THINVISOR, "center", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: database.url: cannot connect to postgresql")
    assert result.stderr.count("\n") == 1 and "secret" not in result.stderr


# --- the commands, against a center in this process -----------------------------------


class ThreadCenter:
    """A center served by uvicorn in a thread of this process, on plain HTTP."""

    def __init__(self, tmp_path: Path) -> None:
        config = CenterConfig(state_dir=tmp_path / "state", api=CenterApiConfig(tls=False))
        self.agent = CenterAgent(config)
        users = UserStore(tmp_path / "state" / "users.json", hasher=FAST)
        self.agent.users = self.agent.gate.users = users
        users.add_user("admin", PASSWORD, Role.ADMIN)
        users.add_user("alice", PASSWORD, Role.READ_ONLY)
        app = create_center_app(self.agent)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, name="center", daemon=True)

    def __enter__(self) -> ThreadCenter:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            time.sleep(0.01)
        raise AssertionError("the center did not start")

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.agent.events.close()

    def env(self, tmp_path: Path, user: str) -> dict[str, str]:
        """An environment logged in to this center as ``user``."""
        _, token = self.agent.users.create_token(user, "test")
        xdg = tmp_path / f"xdg-{user}"
        save_login(
            Login(url=self.url, token=token, user=user), xdg / "thinvisor" / "center-login.json"
        )
        return {"XDG_CONFIG_HOME": str(xdg), "THINVISOR_CENTER_CONFIG": str(tmp_path / "none")}


@pytest.fixture
def center(tmp_path: Path) -> Iterator[ThreadCenter]:
    with ThreadCenter(tmp_path) as running:
        yield running


@pytest.fixture
def hosts() -> Iterator[list[FakeHost]]:
    tag = uuid.uuid4().hex[:6]
    made = [
        fake_host(f"fake://a-{tag}", name="hosta", vms=["web", "db"], templates=["tmpl"],
                  fingerprint=HOST_FINGERPRINT),
        fake_host(f"fake://b-{tag}", name="hostb", vms=["web"]),
    ]  # fmt: skip
    yield made
    for host in made:
        remove_fake_host(host.address)


def test_hosts_tree_and_vms_through_the_cli(
    center: ThreadCenter, hosts: list[FakeHost], tmp_path: Path
) -> None:
    a, b = hosts
    admin = center.env(tmp_path, "admin")
    (tmp_path / "hostpw").write_text("secret\n")
    assert tv(admin, "center", "tree") == (
        "the inventory is empty; start with 'thinvisor center datacenter create'\n"
    )
    tv(admin, "center", "datacenter", "create", "dc1")
    assert tv(admin, "center", "folder", "create", "/dc1", "prod") == "created folder /dc1/prod\n"
    tv(admin, "center", "cluster", "create", "/dc1", "c1")
    add = ["center", "host", "add", a.address, "--provider", "fake", "--parent", "/dc1/prod",
           "--user", "admin", "--password-file", str(tmp_path / "hostpw")]  # fmt: skip
    unpinned = tv(admin, *add, code=1)
    assert unpinned == (
        f"error: fingerprint: {a.address} presented a certificate with SHA-256 fingerprint "
        f"{HOST_FINGERPRINT}; check it on the host and run again with --fingerprint "
        f"{HOST_FINGERPRINT}\n"
    )
    # Trusted as the center saw it: said, then added.
    trusting = CliRunner().invoke(app, [*add, "--yes"], env=admin)
    assert (trusting.exit_code, trusting.stderr, trusting.stdout) == (
        0,
        f"The certificate of {a.address} has the SHA-256 fingerprint\n  {HOST_FINGERPRINT}\n",
        "added host /dc1/prod/hosta (fake, connected)\n",
    )
    tv(admin, "center", "host", "add", b.address, "--provider", "fake", "--parent", "/dc1/c1",
       "--user", "admin", "--password-file", str(tmp_path / "hostpw"))  # fmt: skip
    tree = tv(admin, "center", "tree")
    for line in ("hosta (host, connected)", "web (vm, stopped)", "tmpl (template)"):
        assert line in tree
    hosts_json = json.loads(tv(admin, "center", "host", "list", "--json"))
    assert [h["path"] for h in hosts_json] == ["/dc1/c1/hostb", "/dc1/prod/hosta"]
    found = json.loads(tv(admin, "center", "vm", "find", "web", "--json"))
    assert [v["path"] for v in found] == ["/dc1/c1/hostb/web", "/dc1/prod/hosta/web"]
    ambiguous = tv(admin, "center", "vm", "start", "web", code=1)
    assert ambiguous == (
        "error: vm: 2 vms are named 'web' (/dc1/c1/hostb/web, /dc1/prod/hosta/web): give a path\n"
    )
    assert tv(admin, "center", "vm", "start", "/dc1/prod/hosta/web") == (
        "vm /dc1/prod/hosta/web: running\n"
    )
    assert a.vm_named("web").power_state is PowerState.RUNNING
    assert tv(admin, "center", "vm", "start", "db", "--no-wait").startswith("task ")
    assert tv(admin, "center", "vm", "stop", "nothing", code=1) == "error: no vm named 'nothing'\n"
    listed = json.loads(tv(admin, "center", "vm", "list", "--host", "hostb", "--json"))
    assert [(v["name"], v["power_state"]) for v in listed] == [("web", "stopped")]
    created = tv(admin, "center", "vm", "create", "hosta", "app", "--template", "tmpl")
    assert created == "created vm /dc1/prod/hosta/app (stopped)\n"
    assert tv(admin, "center", "vm", "clone", "app", "app2") == (
        "cloned to vm /dc1/prod/hosta/app2 (stopped)\n"
    )
    assert tv(admin, "center", "vm", "set", "app2", "--memory", "1024") == (
        "vm /dc1/prod/hosta/app2: 1 CPUs, 1024 MiB\n"
    )
    assert tv(admin, "center", "vm", "delete", "app2") == "deleted vm /dc1/prod/hosta/app2\n"
    assert "app2" not in [vm.name for vm in a.vms.values()]


def test_snapshots_tasks_events_through_the_cli(
    center: ThreadCenter, hosts: list[FakeHost], tmp_path: Path
) -> None:
    b = hosts[1]
    admin = center.env(tmp_path, "admin")
    tv(admin, "center", "datacenter", "create", "dc1")
    tv(admin, "center", "host", "add", b.address, "--provider", "fake", "--parent", "/dc1",
       "--user", "admin", "--password-file", "-", stdin="secret\n")  # fmt: skip
    assert tv(admin, "center", "vm", "snapshot", "take", "web", "before").startswith(
        "took snapshot 'before'"
    )
    snaps = json.loads(tv(admin, "center", "vm", "snapshot", "list", "web", "--json"))
    assert [(s["name"], s["current"]) for s in snaps] == [("before", True)]
    assert tv(admin, "center", "vm", "snapshot", "revert", "web", "before") == (
        "reverted to snapshot 'before'\n"
    )
    assert tv(admin, "center", "vm", "snapshot", "delete", "web", "before") == (
        "deleted snapshot 'before'\n"
    )
    tasks = json.loads(tv(admin, "center", "tasks", "--json"))
    assert [t["kind"] for t in tasks] == [
        "vm.snapshot.delete",
        "vm.snapshot.revert",
        "vm.snapshot.create",
    ]
    events = tv(admin, "center", "events", "--kind", "vm.")
    assert "vm.changed host/hostb/vm/web [admin]: hostb: web: snapshot before taken" in events


def add_both(admin: dict[str, str], hosts: list[FakeHost]) -> None:
    """/dc1/hosta and /dc1/hostb, added through the CLI."""
    tv(admin, "center", "datacenter", "create", "dc1")
    for host, pinned in zip(hosts, (["--fingerprint", HOST_FINGERPRINT], []), strict=True):
        add = ["center", "host", "add", host.address, "--provider", "fake", "--parent", "/dc1"]
        tv(admin, *add, "--user", "admin", "--password-file", "-", *pinned, stdin="secret\n")


MOVED = re.compile(
    r"moved /dc1/hosta/db to hostb in \d+\.\d s \(downtime \d+ ms, 256\.0 MiB transferred\)\n"
)


def test_a_migration_summary_says_when_the_vm_was_paused_for_the_copy() -> None:
    result = {
        "source": "/dc1/hosta/db",
        "vm": {"host": "hostb"},
        "total_ms": 900,
        "downtime_ms": 640,
        "memory_copy": "paused",
        "transferred_bytes": 64 << 20,
    }
    assert center_vm.migrated(result) == (
        "moved /dc1/hosta/db to hostb in 0.9 s "
        "(downtime 640 ms, paused for the memory copy, 64.0 MiB transferred)"
    )
    live = center_vm.migrated({**result, "memory_copy": "live"})
    assert "(downtime 640 ms, 64.0 MiB" in live


def test_a_live_migration_through_the_cli(
    center: ThreadCenter, hosts: list[FakeHost], tmp_path: Path
) -> None:
    a, b = hosts
    admin = center.env(tmp_path, "admin")
    add_both(admin, hosts)
    stopped = tv(admin, "center", "vm", "migrate", "db", "hostb", code=1)
    assert stopped == "error: vm 'db': cannot migrate while stopped\n"
    tv(admin, "center", "vm", "start", "db")
    assert MOVED.fullmatch(
        tv(admin, "center", "vm", "migrate", "db", "hostb", "--downtime-ms", "50")
    )
    assert b.vm_named("db").power_state is PowerState.RUNNING
    assert "db" not in {vm.name for vm in a.vms.values()}
    options = ["--no-auto-converge", "--bandwidth", "100", "--json"]
    back = json.loads(tv(admin, "center", "vm", "migrate", "/dc1/hostb/db", "/dc1/hosta", *options))
    assert (back["source"], back["vm"]["path"], back["mode"]) == (
        "/dc1/hostb/db", "/dc1/hosta/db", "shared")  # fmt: skip
    tv(admin, "center", "vm", "start", "/dc1/hosta/web")
    taken = tv(admin, "center", "vm", "migrate", "/dc1/hosta/web", "hostb", code=1)
    assert taken == f"error: {b.address}: a vm named 'web' exists\n"
    assert "Invalid value" in tv(admin, "center", "vm", "migrate", "db", "hostb",
                                 "--downtime-ms", "5", code=2)  # fmt: skip
    assert a.vm_named("web").power_state is PowerState.RUNNING


def test_a_migration_is_cancelled_by_the_start_of_its_id(
    center: ThreadCenter, hosts: list[FakeHost], tmp_path: Path
) -> None:
    a, b = hosts
    admin = center.env(tmp_path, "admin")
    add_both(admin, hosts)
    tv(admin, "center", "vm", "start", "db")
    a.slow_migrations(30)
    started = tv(admin, "center", "vm", "migrate", "db", "hostb", "--no-wait")
    task_id = started.split()[1]
    assert started == f"task {task_id} started: vm.migrate /dc1/hosta/db\n"
    login = Login(
        url=center.url, token=center.agent.users.create_token("admin", "t")[1], user="admin"
    )

    async def cancel(ref: str) -> dict[str, Any]:
        async with CenterClient(login) as client:
            return await client.cancel_task(ref)

    with pytest.raises(NotFound, match="task 'nothing' does not exist"):
        asyncio.run(cancel("nothing"))
    done = asyncio.run(cancel(task_id[:8]))
    assert (done["id"], done["state"], done["error"]["error"]) == (task_id, "error", "cancelled")
    assert a.vm_named("db").power_state is PowerState.RUNNING and "db" not in {
        vm.name for vm in b.vms.values()
    }


def test_permissions_tags_and_the_tree_through_the_cli(
    center: ThreadCenter, hosts: list[FakeHost], tmp_path: Path
) -> None:
    a, b = hosts
    admin, alice = center.env(tmp_path, "admin"), center.env(tmp_path, "alice")
    tv(admin, "center", "datacenter", "create", "dc1")
    tv(admin, "center", "folder", "create", "/dc1", "prod")
    tv(admin, "center", "folder", "create", "/dc1", "dev")
    for host, folder in ((a, "prod"), (b, "dev")):
        tv(admin, "center", "host", "add", host.address, "--provider", "fake", "--parent",
           f"/dc1/{folder}", "--user", "admin", "--password-file", "-",
           "--fingerprint", HOST_FINGERPRINT, stdin="secret\n")  # fmt: skip
    denied = tv(alice, "center", "vm", "start", "/dc1/prod/hosta/db", code=1)
    assert denied == (
        "error: user 'alice' may not power /dc1/prod/hosta/db (role there: read-only)\n"
    )
    assert tv(admin, "center", "grant", "/dc1/prod", "alice", "operator") == (
        "alice is operator on /dc1/prod and below\n"
    )
    assert tv(alice, "center", "vm", "start", "/dc1/prod/hosta/db") == (
        "vm /dc1/prod/hosta/db: running\n"
    )
    tv(alice, "center", "vm", "start", "/dc1/dev/hostb/web", code=1)
    grants = json.loads(tv(admin, "center", "permissions", "--json"))
    assert [(g["path"], g["user"], g["role"]) for g in grants] == [
        ("/dc1/prod", "alice", "operator")
    ]
    assert tv(admin, "center", "revoke", "/dc1/prod", "alice") == (
        "alice has no role granted on /dc1/prod any more\n"
    )
    tv(admin, "center", "tag", "create", "gold", "--category", "tier")
    assert tv(admin, "center", "tag", "add", "/dc1/prod/hosta", "gold") == (
        "/dc1/prod/hosta is tagged 'gold'\n"
    )
    shown = json.loads(tv(admin, "center", "tag", "show", "gold", "--json"))
    assert [n["path"] for n in shown["nodes"]] == ["/dc1/prod/hosta"]
    # Hosts are named by their name here as in 'host remove', 'vm list --host'.
    assert tv(admin, "center", "move", "hosta", "/dc1/dev") == (
        "/dc1/prod/hosta is now /dc1/dev/hosta\n"
    )
    assert tv(admin, "center", "move", "hosta", "web", code=1) == (
        "error: object: 2 objects are named 'web' (/dc1/dev/hosta/web, /dc1/dev/hostb/web): "
        "give a path\n"
    )
    assert tv(admin, "center", "move", "nothing", "/dc1", code=1) == (
        "error: no host or VM named 'nothing'; give a path such as /dc1/folder\n"
    )
    assert tv(admin, "center", "rename", "/dc1/dev", "test") == "/dc1/dev is now /dc1/test\n"
    assert tv(admin, "center", "remove", "/dc1/test", code=1) == (
        "error: node: folder /dc1/test is not empty (2 objects in it)\n"
    )
    assert tv(admin, "center", "remove", "/dc1/prod") == "removed folder /dc1/prod\n"
    assert tv(admin, "center", "host", "remove", "hostb") == "removed host /dc1/test/hostb\n"
    assert tv(admin, "center", "remove", "/dc9", code=1) == "error: no inventory object at /dc9\n"


def test_without_a_login_the_commands_say_how_to_log_in(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert tv(env, "center", "tree", code=1) == (
        "error: not logged in to a center: run 'thinvisor center login URL' first\n"
    )
    assert tv(env, "center", "logout") == "not logged in to a center\n"


def test_a_center_that_does_not_answer_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    login = Login(url=f"http://127.0.0.1:{port}", token="tv_x", user="admin")
    save_login(login, tmp_path / "xdg" / "thinvisor" / "center-login.json")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    error = tv(env, "center", "vm", "list", code=1)
    assert error.startswith(f"error: cannot reach http://127.0.0.1:{port}")
    assert error.count("\n") == 1


# --- the local center's files -----------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_removing_a_user_takes_their_grants_away(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # made by hand, or by an older center
    env = {"THINVISOR_CENTER_CONFIG": str(config)}
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    tv(env, "center", "init", "--password-file", str(tmp_path / "pw"))
    assert mode(state) == 0o700
    tv(env, "center", "user", "add", "bob", "--role", "no-access",
       "--password-file", str(tmp_path / "pw"))  # fmt: skip
    database = open_database(f"sqlite:///{state / 'inventory.db'}")
    try:
        inventory = Inventory(database, SecretBox(state / "secret.key"))
        dc = inventory.create_datacenter("dc1")
        prod = inventory.create_folder(dc.id, "prod")
        permissions = Permissions(database)
        permissions.grant(dc.id, "bob", Role.READ_ONLY)
        permissions.grant(prod.id, "bob", Role.OPERATOR)
        permissions.grant(prod.id, "admin", Role.READ_ONLY)
        assert tv(env, "center", "user", "remove", "bob") == (
            "removed user 'bob' and their roles on 2 objects\n"
        )
        # A new bob is not the old one: he has only what he is given.
        assert permissions.grants(principal="bob") == []
        assert [g.principal for g in permissions.grants()] == ["admin"]
    finally:
        database.close()
    assert (
        tv(env, "center", "user", "remove", "bob", code=1) == "error: user 'bob' does not exist\n"
    )
    assert mode(state / "inventory.db") == 0o600


# --- adding a host that presents a certificate ----------------------------------------


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A thinvisor host's API that refuses every credential."""

    def do_GET(self) -> None:
        body = json.dumps({"error": "unauthorized", "message": "wrong user name or password"})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that drop the connection after the handshake (to learn the certificate)


@pytest.fixture
def tls_host(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """An HTTPS server standing for a host that refuses every credential: its URL and its
    certificate's fingerprint."""
    cert, key = tmp_path / "host.crt", tmp_path / "host.key"
    fp = ensure_certificate(cert, key, ["localhost"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = _Server(("127.0.0.1", 0), _Refusing)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", fp
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_hosts_certificate_is_shown_before_its_password_is_asked(
    center: ThreadCenter, tls_host: tuple[str, str], tmp_path: Path
) -> None:
    url, fp = tls_host
    admin = center.env(tmp_path, "admin")
    tv(admin, "center", "datacenter", "create", "dc1")
    add = ["center", "host", "add", f"{url}/", "--parent", "/dc1", "--user", "admin"]
    hints = {
        "thinvisor": "check it on the host ('thinvisor host info' there)",
        "vsphere": "compare it with the fingerprint of the certificate the vCenter or ESXi "
        "shows (in its client, or with openssl)",
    }
    for provider, hint in hints.items():
        # No password is given: had it been asked for, the prompt would have failed.
        result = CliRunner().invoke(app, [*add, "--provider", provider], env=admin)
        assert result.exit_code == 1
        assert result.output == (
            f"error: fingerprint: {url}/ presented a certificate with SHA-256 fingerprint "
            f"{fp}; {hint} and run again with --fingerprint {fp}\n"
        )
    (tmp_path / "hostpw").write_text("wrong\n")
    with_password = [*add, "--provider", "thinvisor", "--password-file", str(tmp_path / "hostpw")]
    trusted = tv(admin, *with_password, "--yes", code=1)
    assert trusted == (
        f"The certificate of {url}/ has the SHA-256 fingerprint\n  {fp}\n"
        f"error: password: {url}: the host refused the credentials: wrong user name or password\n"
    )
    assert tv(admin, *with_password, "--fingerprint", fp, code=1).endswith(
        "the host refused the credentials: wrong user name or password\n"
    )


# --- what the commands print ------------------------------------------------------------


def test_help_texts_keep_their_brackets() -> None:
    # Help is rich markup: "[the host's own]" would be read as a tag and vanish.
    def commands(command: Any) -> Iterator[Any]:
        yield command
        for sub in getattr(command, "commands", {}).values():  # a group's
            yield from commands(sub)

    center = typer.main.get_command(center_cli.app)
    texts = [
        (command.name, text)
        for command in commands(center)
        for text in [command.help or "", *(getattr(p, "help", None) or "" for p in command.params)]
    ]
    assert len(texts) > 100
    eaten = [(name, text) for name, text in texts if Text.from_markup(text).plain != text]
    assert eaten == []
    help_text = tv({"COLUMNS": "200"}, "center", "host", "add", "--help")
    assert "Its name (default: the one the host gives)." in help_text
    assert "CPUs (default: 1, or the template's)." in tv(
        {"COLUMNS": "200"}, "center", "vm", "create", "--help"
    )


def test_info_shows_the_whole_fingerprint_on_a_narrow_terminal(
    center: ThreadCenter, tmp_path: Path
) -> None:
    center.agent.tls_fingerprint = ":".join(["C9"] * 32)
    info = tv({**center.env(tmp_path, "alice"), "COLUMNS": "60"}, "center", "info")
    assert f"TLS fingerprint  {center.agent.tls_fingerprint}\n" in info
    assert "database         sqlite\n" in info


# --- the serial console through the center ----------------------------------------------


@pytest.fixture
def console_host() -> Iterator[str]:
    """A WebSocket server standing for a host's serial console: it sends its history,
    then echoes what it gets, upper-cased. Its ws:// address."""

    def handler(conn: ServerConnection) -> None:
        conn.send(b"booted\nlogin: ")
        for message in conn:
            conn.send(message.upper() if isinstance(message, bytes) else message.encode())

    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
        server.shutdown()
        thread.join(5)


def test_the_serial_console_through_the_center(
    center: ThreadCenter, console_host: str, tmp_path: Path
) -> None:
    host = fake_host(console_host, name="con1", username=None, vms=["vm1"])
    try:
        admin = center.env(tmp_path, "admin")
        tv(admin, "center", "datacenter", "create", "dc1")
        tv(admin, "center", "host", "add", console_host, "--provider", "fake", "--parent", "/dc1")
        result = subprocess.run(
            [THINVISOR, "center", "vm", "console", "vm1", "--history", "1"],
            input=b"hello\n",
            capture_output=True,
            env={**os.environ, **admin},
            timeout=60,
            check=False,
        )
        assert (result.returncode, result.stderr) == (0, b"")
        assert result.stdout == b"booted\nlogin: HELLO\n"
    finally:
        remove_fake_host(host.address)


def test_the_serial_console_url_and_credentials() -> None:
    fp = ":".join(["AB"] * 32)
    login = Login(url="https://c.example:9443", token="tv_x", fingerprint=fp, user="u")
    target = serial_target(login, 42, "serial 1")
    assert target.url == "wss://c.example:9443/api/v1/vms/42/console/serial?port=serial%201"
    assert (target.headers, target.fingerprint) == ({"Authorization": "Bearer tv_x"}, fp)
    changed = target.changed(target.server, "00", fp)
    assert "'thinvisor center login https://c.example:9443'" in str(changed)
    plain = serial_target(Login(url="http://c:9443", token="t", user="u"), 7, None)
    assert (plain.url, plain.fingerprint) == ("ws://c:9443/api/v1/vms/7/console/serial", None)
