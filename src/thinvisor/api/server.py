"""``thinvisor host serve``: the agent behind uvicorn, with TLS unless turned off.

SIGTERM and SIGINT stop the agent gracefully; the VMs keep running.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any, Literal

import uvicorn

from thinvisor.api.app import create_app
from thinvisor.config import HostConfig
from thinvisor.errors import InvalidConfig
from thinvisor.host.agent import HostAgent
from thinvisor.host.migration import MigrationService
from thinvisor.network import namespace
from thinvisor.tls import ensure_certificate

log = logging.getLogger(__name__)

#: How long a stopping server waits for open connections before closing them.
GRACEFUL_SHUTDOWN_S = 5


def certificate_files(
    state_dir: Path, cert_file: Path | None, key_file: Path | None, name: str
) -> tuple[Path, Path]:
    """A server's certificate and key: the operator's, or the self-signed pair
    ``<state_dir>/tls/<name>.crt`` and ``.key``."""
    tls_dir = state_dir / "tls"
    return cert_file or tls_dir / f"{name}.crt", key_file or tls_dir / f"{name}.key"


def tls_files(config: HostConfig) -> tuple[Path, Path]:
    """The agent's certificate and key: the operator's, or thinvisor's self-signed pair."""
    return certificate_files(config.state_dir, config.api.cert_file, config.api.key_file, "host")


def ensure_tls(cert: Path, key: Path) -> str:
    """Make a self-signed pair for this machine's names where there is none; the
    certificate's SHA-256 fingerprint."""
    cert.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = sorted({socket.getfqdn(), socket.gethostname(), "localhost"})
    return ensure_certificate(cert, key, names)


def prepare_tls(config: HostConfig) -> tuple[Path, Path, str]:
    cert, key = tls_files(config)
    return cert, key, ensure_tls(cert, key)


def serve(config: HostConfig, *, listen: str | None = None, port: int | None = None) -> None:
    # A daemon says what it does: events, VM starts and stops, requests.
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    agent = HostAgent(config)
    tls: dict[str, str] = {}
    scheme = "http"
    if config.api.tls:
        cert, key, fingerprint = prepare_tls(config)
        agent.tls_fingerprint = fingerprint
        tls = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        scheme = "https"
        log.info("TLS certificate SHA-256 fingerprint: %s", fingerprint)
    host = listen or config.api.listen
    servers = [_server(create_app(agent), host, port or config.api.port, tls, lifespan="on")]
    log.info("thinvisor host agent on %s://%s:%d/api/v1", scheme, host, port or config.api.port)
    servers += _cim_servers(config, agent, host, tls)
    migration_sock = _migration_port(config, agent, host)
    # Bind first, then move into the VMs' network namespace: the sockets stay reachable
    # where the agent was started, everything made later (bridges, TAPs, QEMU, dnsmasq)
    # lives in the namespace.
    bound = [(server, _listening(server)) for server in servers]
    migration_sock.listen(16)
    namespace.enter(config.network.namespace)
    asyncio.run(_serve_all(bound))


def _migration_port(config: HostConfig, agent: HostAgent, api_host: str) -> socket.socket:
    """Bind live migration's port (TLS with the agent's certificate, whether or not the
    API uses TLS: a VM's memory never crosses the network in plain text)."""
    cert, key, fingerprint = prepare_tls(config)
    host = config.migration.listen or api_host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, config.migration.port))
    except OSError as exc:
        sock.close()
        raise InvalidConfig(
            f"migration.port: cannot listen on {host}:{config.migration.port}: {exc}"
        ) from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    port = sock.getsockname()[1]
    agent.migration = MigrationService(agent.service, port, fingerprint)
    agent.migration_listener = (sock, cert, key)
    log.info("live migration on %s:%d (TLS)", host, port)
    return sock


def _listening(server: uvicorn.Server) -> socket.socket:
    """The server's bound socket; its connections send small answers at once.

    Sockets bound here (not by uvicorn) otherwise keep Nagle's algorithm on, and each
    answer waits for the client's delayed ACK: some 40 ms per request.
    """
    sock = server.config.bind_socket()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _server(
    app: Any, host: str, port: int, tls: dict[str, str], *, lifespan: Literal["on", "off"]
) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            ws="websockets-sansio",
            lifespan=lifespan,
            server_header=False,
            log_config=None,
            # A client holding a connection open (a CIM client's keep-alive after an
            # error answer, say) must not keep a stopping agent from exiting.
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            **tls,  # type: ignore[arg-type]
        )
    )


def _cim_servers(
    config: HostConfig, agent: HostAgent, host: str, tls: dict[str, str]
) -> list[uvicorn.Server]:
    """The CIM server: HTTPS on ``[cim] port``, plain HTTP only on ``[cim] http_port``."""
    if not config.cim.enabled:
        return []
    from thinvisor.cim.providers import default_registry
    from thinvisor.cim.schema import load_repository
    from thinvisor.cim.server import create_cim_app

    app = create_cim_app(agent, load_repository(config.cache_dir), default_registry())
    servers = []
    if tls:
        servers.append(_server(app, host, config.cim.port, tls, lifespan="off"))
        log.info("CIM server on https://%s:%d/cimom", host, config.cim.port)
    if config.cim.http_port is not None:
        servers.append(_server(app, host, config.cim.http_port, {}, lifespan="off"))
        log.info("CIM server on http://%s:%d/cimom (plain HTTP)", host, config.cim.http_port)
    return servers


async def _serve_all(servers: list[tuple[uvicorn.Server, socket.socket]]) -> None:
    """Run every server; when one stops (SIGTERM reaches them all), stop the others."""
    tasks = [asyncio.create_task(s.serve(sockets=[sock])) for s, sock in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server, _ in servers:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
