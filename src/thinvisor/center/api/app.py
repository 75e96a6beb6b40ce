"""The center's ASGI app: ``create_center_app(agent)``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from thinvisor import __version__
from thinvisor.api import auth, errors
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api import consoles, grants, history, hosts, info, tags, tree, vms

PREFIX = "/api/v1"


def create_center_app(agent: CenterAgent, *, start_agent: bool = True) -> FastAPI:
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
        title="thinvisor center API",
        version=__version__,
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=f"{PREFIX}/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.agent = agent
    errors.install(app)
    # The host agent's own login routes serve the center as they are: they need only the
    # agent's users and event log. Tasks and events are the center's: filtered per user.
    for module in (info, auth, tree, hosts, vms, consoles, tags, grants, history):
        app.include_router(module.router, prefix=PREFIX)
    return app
