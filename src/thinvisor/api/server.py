"""``thinvisor host serve``: the agent behind uvicorn, with TLS unless turned off.

SIGTERM and SIGINT stop the agent gracefully; the VMs keep running.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import uvicorn

from thinvisor.api.app import create_app
from thinvisor.config import HostConfig
from thinvisor.host.agent import HostAgent
from thinvisor.tls import ensure_certificate

log = logging.getLogger(__name__)


def tls_files(config: HostConfig) -> tuple[Path, Path]:
    """The agent's certificate and key: the operator's, or thinvisor's self-signed pair."""
    tls_dir = config.state_dir / "tls"
    cert = config.api.cert_file or tls_dir / "host.crt"
    key = config.api.key_file or tls_dir / "host.key"
    return cert, key


def prepare_tls(config: HostConfig) -> tuple[Path, Path, str]:
    cert, key = tls_files(config)
    cert.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = sorted({socket.getfqdn(), socket.gethostname(), "localhost"})
    return cert, key, ensure_certificate(cert, key, names)


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
    bind_port = port or config.api.port
    log.info("thinvisor host agent on %s://%s:%d/api/v1", scheme, host, bind_port)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(agent),
            host=host,
            port=bind_port,
            ws="websockets-sansio",
            lifespan="on",
            server_header=False,
            log_config=None,
            **tls,  # type: ignore[arg-type]
        )
    )
    server.run()
