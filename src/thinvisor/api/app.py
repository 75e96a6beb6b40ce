"""The host agent's REST API: FastAPI, everything under ``/api/v1``.

Routes only parse, authorise and translate; the work is the service's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from thinvisor import __version__
from thinvisor.api import (
    auth,
    consoles,
    datastores,
    errors,
    events,
    host,
    networks,
    resources,
    snapshots,
    stats,
    storage,
    tasks,
    vms,
)
from thinvisor.host.agent import HostAgent

PREFIX = "/api/v1"


def create_app(agent: HostAgent, *, start_agent: bool = True) -> FastAPI:
    """The ASGI app serving ``agent``; starting it starts the agent, stopping stops it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_agent:
            await agent.start()
        try:
            yield
        finally:
            if start_agent:
                await agent.stop()

    app = FastAPI(
        title="thinvisor host API",
        version=__version__,
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=f"{PREFIX}/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.agent = agent
    errors.install(app)
    routers = (
        host,
        auth,
        vms,
        resources,
        snapshots,
        networks,
        tasks,
        events,
        datastores,
        storage,
        consoles,
        stats,
    )
    for module in routers:
        app.include_router(module.router, prefix=PREFIX)
    # Where Prometheus looks by default, outside the versioned API.
    app.include_router(stats.metrics_router)
    return app
