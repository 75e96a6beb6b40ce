"""``thinvisor center serve``: the center behind uvicorn, with TLS unless turned off.

One server on ``[api] listen:port``. SIGTERM and SIGINT stop it gracefully: requests in
flight finish, every host's sync stops, the database is closed. A database that cannot be
reached, or TLS files that cannot be used, stop it before it listens, with one line.
"""

from __future__ import annotations

import asyncio
import logging

from thinvisor.api.server import _listening, _serve_all, _server, certificate_files, ensure_tls
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api.app import create_center_app
from thinvisor.center.config import CenterConfig
from thinvisor.fs import private_dir

log = logging.getLogger(__name__)


def serve(config: CenterConfig, *, listen: str | None = None, port: int | None = None) -> None:
    """Run the center until SIGTERM or SIGINT."""
    # A daemon says what it does: hosts connecting and lost, requests.
    logging.getLogger().setLevel(logging.INFO)
    private_dir(config.state_dir)
    agent = CenterAgent(config)  # opens (and migrates) the database: fails here if it cannot
    try:
        tls = _tls(config, agent)
        host = listen or config.api.listen
        bound = port or config.api.port
        server = _server(create_center_app(agent), host, bound, tls, lifespan="on")
        sock = _listening(server)
    except BaseException:
        agent.database.close()
        raise
    scheme = "https" if tls else "http"
    log.info("thinvisor center on %s://%s:%d/api/v1 (%s)", scheme, host, bound, agent.database.url)
    asyncio.run(_serve_all([(server, sock)]))


def _tls(config: CenterConfig, agent: CenterAgent) -> dict[str, str]:
    """uvicorn's TLS settings (none without TLS); the fingerprint set on the agent."""
    if not config.api.tls:
        return {}
    api = config.api
    cert, key = certificate_files(config.state_dir, api.cert_file, api.key_file, "center")
    agent.tls_fingerprint = ensure_tls(cert, key)
    log.info("TLS certificate SHA-256 fingerprint: %s", agent.tls_fingerprint)
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
