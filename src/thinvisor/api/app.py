"""The host agent's REST API: FastAPI, everything under ``/api/v1``.

Routes only parse, authorise and translate; the work is the service's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Protocol

from fastapi import FastAPI

from thinvisor import __version__
from thinvisor.api import (
    auth,
    consoles,
    datastores,
    errors,
    events,
    ha,
    host,
    migrations,
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


class Agent(Protocol):
    """What an app serves: a host agent or a center, started and stopped with it."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def agent_app(
    agent: Agent, title: str, routers: Iterable[ModuleType], *, start_agent: bool = True
) -> FastAPI:
    """An ASGI app serving ``agent`` with the ``router`` of each of ``routers`` under
    ``/api/v1``; starting it starts the agent, stopping stops it (unless not
    ``start_agent``)."""

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
        title=title,
        version=__version__,
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=f"{PREFIX}/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.agent = agent
    errors.install(app)
    for module in routers:
        app.include_router(module.router, prefix=PREFIX)
    return app


def create_app(agent: HostAgent, *, start_agent: bool = True) -> FastAPI:
    """The ASGI app serving ``agent``; starting it starts the agent, stopping stops it."""
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
        migrations,
        ha,
    )
    app = agent_app(agent, "thinvisor host API", routers, start_agent=start_agent)
    # Where Prometheus looks by default, outside the versioned API.
    app.include_router(stats.metrics_router)
    return app
