"""``/health`` and ``/center``: is the center up, and what does it manage."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Request
from pydantic import BaseModel

from thinvisor import __version__
from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.auth import Permission
from thinvisor.center.api.access import Caller, center_of, check, in_thread

router = APIRouter(tags=["center"], responses=ERROR_RESPONSES)


class Health(BaseModel):
    status: str
    version: str


class CenterInfo(BaseModel):
    version: str
    tls_fingerprint: str | None
    database: str
    """``sqlite`` or ``postgresql``."""
    hosts: dict[str, int]
    """Hosts by connection state."""
    vms: dict[str, int]
    """VMs (templates apart) by power state."""
    templates: int


@router.get("/health", response_model=Health)
async def health() -> Health:
    """Whether the center answers; the one route that needs no authentication."""
    return Health(status="ok", version=__version__)


@router.get("/center", response_model=CenterInfo)
async def center_info(request: Request, user: Caller) -> CenterInfo:
    """Version, TLS fingerprint, database, and how many hosts and VMs, by state."""
    agent = center_of(request)

    def read() -> CenterInfo:
        check(agent, user, None, Permission.READ)
        hosts = Counter(str(h.state) for h in agent.inventory.hosts())
        vms = agent.inventory.vms()
        return CenterInfo(
            version=__version__,
            tls_fingerprint=agent.tls_fingerprint,
            database=agent.database.dialect,
            hosts=dict(hosts),
            vms=dict(Counter(str(v.power_state) for v in vms if not v.template)),
            templates=sum(v.template for v in vms),
        )

    return await in_thread(read)
