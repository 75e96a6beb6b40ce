"""The center's ASGI app: ``create_center_app(agent)``."""

from __future__ import annotations

from fastapi import FastAPI

from thinvisor.api import auth
from thinvisor.api.app import agent_app
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api import (
    consoles,
    grants,
    ha,
    history,
    hosts,
    info,
    rules,
    tags,
    tree,
    vms,
)


def create_center_app(agent: CenterAgent, *, start_agent: bool = True) -> FastAPI:
    """The ASGI app serving ``agent``; starting it starts the agent, stopping stops it."""
    # The host agent's own login routes serve the center as they are: they need only the
    # agent's users and event log. Tasks and events are the center's: filtered per user.
    routers = (info, auth, tree, hosts, vms, consoles, tags, grants, history, rules, ha)
    return agent_app(agent, "thinvisor center API", routers, start_agent=start_agent)
