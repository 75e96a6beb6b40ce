"""The CLI's remote client without an agent: error bodies, the login file, URLs, and
certificate pinning against a small local HTTPS server."""

from __future__ import annotations

import asyncio
import http.server
import inspect
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from thinvisor import errors
from thinvisor.cli import remote
from thinvisor.cli.main import app
from thinvisor.cli.remote import (
    CertificateChanged,
    Login,
    RemoteError,
    RemoteHost,
    agent_url,
    error_from,
    load_login,
    login_path,
    open_serial,
    remove_login,
    save_login,
)
from thinvisor.host.tasks import error_code
from thinvisor.tls import ensure_certificate


def test_every_error_class_has_its_api_code() -> None:
    classes = [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, errors.ThinvisorError)
    ]
    for cls in classes:
        code = error_code(cls.__new__(cls))
        assert remote.ERRORS[code] is cls
    assert len(remote.ERRORS) == len(classes)


def test_error_bodies_become_thinvisor_errors_with_the_servers_message() -> None:
    exc = error_from("invalid_state", "vm 'x': cannot pause while stopped")
    assert isinstance(exc, errors.InvalidState)
    assert str(exc) == "vm 'x': cannot pause while stopped"
    assert (exc.vm, exc.action, exc.state) == ("x", "pause", "stopped")
    exc = error_from("invalid_argument", "memory_mib: too big")
    assert isinstance(exc, errors.InvalidArgument)
    assert (str(exc), exc.field, exc.reason) == ("memory_mib: too big", "memory_mib", "too big")
    assert isinstance(error_from("qemu_error", "boom"), errors.BackendError)
    other = error_from("forbidden", "role read-only may not power", 403)
    assert isinstance(other, RemoteError)
    assert (str(other), other.code, other.http_status) == (
        "role read-only may not power",
        "forbidden",
        403,
    )


def test_the_login_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = login_path()
    assert path == tmp_path / "xdg" / "thinvisor" / "login.json"
    assert load_login() is None
    login = Login(url="https://h:8443", token="t0k", fingerprint="AB:CD", user="admin")
    assert save_login(login) == path
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_login() == login
    path.write_text("{not json")
    with pytest.raises(errors.InvalidConfig, match="is not a thinvisor login"):
        load_login()
    path.write_text(json.dumps(login.model_dump()))
    assert remove_login() == login
    assert not path.exists() and remove_login() is None


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("https://h:9000", "https://h:9000"),
        ("https://h:9000/api/v1/", "https://h:9000"),
        ("h", "https://h:8443"),
        ("h:1234", "https://h:1234"),
        ("https://h", "https://h"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
        ("https://[::1]:8443", "https://[::1]:8443"),
    ],
)
def test_agent_urls(text: str, url: str) -> None:
    assert agent_url(text) == url


@pytest.mark.parametrize("text", ["ftp://h", "https://h:1/elsewhere", "https://"])
def test_bad_agent_urls(text: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        agent_url(text)


class _Agent(http.server.BaseHTTPRequestHandler):
    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(self.path)
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that drop the connection after the handshake


@pytest.fixture
def tls_agent(tmp_path: Path) -> Iterator[tuple[str, str, list[str]]]:
    """A TLS server answering ``[]`` to every GET: its URL, fingerprint and the paths seen."""
    cert, key = tmp_path / "host.crt", tmp_path / "host.key"
    fingerprint = ensure_certificate(cert, key, ["localhost"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    seen: list[str] = []
    handler = type("Handler", (_Agent,), {"seen": seen})
    server = _Server(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", fingerprint, seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _list(login: Login) -> list[remote.RemoteVmInfo]:
    async def go() -> list[remote.RemoteVmInfo]:
        async with RemoteHost(login) as host:
            return await host.list_vms()

    return asyncio.run(go())


def test_the_pinned_certificate_is_accepted(tls_agent: tuple[str, str, list[str]]) -> None:
    url, fingerprint, seen = tls_agent
    assert remote.server_fingerprint(url) == fingerprint
    assert _list(Login(url=url, token="t", fingerprint=fingerprint, user="u")) == []
    assert seen == ["/api/v1/vms"]


def test_another_certificate_is_refused_before_the_request(
    tls_agent: tuple[str, str, list[str]],
) -> None:
    url, fingerprint, seen = tls_agent
    login = Login(url=url, token="secret", fingerprint=":".join(["00"] * 32), user="u")
    with pytest.raises(CertificateChanged, match="certificate has changed") as caught:
        _list(login)
    assert fingerprint in str(caught.value)
    with pytest.raises(CertificateChanged):
        open_serial(login, "x", "serial0")
    assert seen == []  # neither the request nor the token left the client


def _tv(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def test_vm_commands_go_where_the_login_says(tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    config.write_text(
        f'run_dir = "{tmp_path / "run"}"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[[datastores]]\nname = "local"\npath = "{tmp_path / "ds"}"\n'
    )
    env = {"THINVISOR_CONFIG": str(config), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert _tv(env, "vm", "list", "--json") == (0, "[]\n", "")
    port = unused_port()
    login = Login(url=f"https://127.0.0.1:{port}", token="t", fingerprint="AB", user="u")
    save_login(login, tmp_path / "xdg" / "thinvisor" / "login.json")
    code, _, err = _tv(env, "vm", "list")
    assert code == 1 and err.startswith(f"error: cannot reach https://127.0.0.1:{port}")
    assert err.count("\n") == 1
    assert _tv({**env, "THINVISOR_LOCAL": "1"}, "vm", "list", "--json") == (0, "[]\n", "")


def unused_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
