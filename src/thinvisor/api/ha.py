"""``/ha``: high availability's host side, for the center (see ``thinvisor.host.ha``):
the datastore heartbeats, the center's heartbeat that arms the watchdog, and taking a
VM of a dead host over."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field, field_validator

from thinvisor.api.auth import agent_of, require
from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.api.vms import VmOut, vm_out
from thinvisor.auth import Permission, User
from thinvisor.host.ha import DEFAULT_CENTER_TIMEOUT_S
from thinvisor.model.base import StrictModel
from thinvisor.model.vm import check_name

router = APIRouter(prefix="/ha", tags=["ha"], responses=ERROR_RESPONSES)

Reader = Annotated[User, Depends(require(Permission.READ))]
# Fencing and taking VMs over are the center's work: it holds the hosts' admin credentials.
Admin = Annotated[User, Depends(require(Permission.ADMIN))]


class HeartbeatOut(BaseModel):
    host: str = Field(description="the id of the host that wrote it")
    seq: int = Field(description="its writer's count, growing with each write")
    time: float = Field(description="when it was written, by the writer's clock (Unix time)")
    age_s: float = Field(description="seconds since the file changed, by this host's clock")


class CenterHeartbeat(StrictModel):
    timeout_s: float = Field(
        default=DEFAULT_CENTER_TIMEOUT_S,
        ge=1,
        le=3600,
        description="fence the host when the center stays silent this long (and the "
        "datastores are lost as long)",
    )


class CenterHeartbeatOut(BaseModel):
    host_id: str
    fenced: bool = Field(description="whether the host fenced itself since the last heartbeat")


class RecoverRequest(StrictModel):
    vm: str = Field(description="the VM's directory name on the datastore")
    datastore: str
    start: bool = Field(default=True, description="power the VM on once it is this host's")

    @field_validator("vm")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)


@router.get("/heartbeats", response_model=list[HeartbeatOut])
async def heartbeats(
    request: Request, user: Reader, datastore: Annotated[str, Query()]
) -> list[HeartbeatOut]:
    """Every host's heartbeat on a datastore."""
    beats = await agent_of(request).ha.heartbeats(datastore)
    return [HeartbeatOut.model_validate(b.to_dict()) for b in beats]


@router.post("/heartbeat", response_model=CenterHeartbeatOut)
async def center_heartbeat(
    request: Request, user: Admin, body: CenterHeartbeat | None = None
) -> CenterHeartbeatOut:
    """The center is alive: (re)arms the watchdog, which fences the host once the center
    and the datastores are both lost for ``timeout_s``."""
    ha = agent_of(request).ha
    fenced = ha.center_heartbeat((body or CenterHeartbeat()).timeout_s)
    return CenterHeartbeatOut(host_id=ha.host_id, fenced=fenced)


@router.post("/recover", response_model=VmOut)
async def recover(body: RecoverRequest, request: Request, user: Admin) -> VmOut:
    """Take over a VM of another host on a shared datastore (its owner file then names
    this host), and start it unless told not to. Only once that host can no longer
    write: this host does not check."""
    ha = agent_of(request).ha
    return vm_out(await ha.recover(body.vm, body.datastore, start=body.start))
