"""Live migration between hosts (the center calls these): ``POST /migrations/incoming``
on the destination for a ticket, then ``POST /vms/{name}/migrate`` on the source with it.
The move itself runs between the two agents on the migration port."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from thinvisor.api.auth import agent_of, require
from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.api.tasks import ACCEPTED, accepted
from thinvisor.auth import Permission, User
from thinvisor.errors import Unsupported
from thinvisor.host.incoming import IncomingRequest
from thinvisor.host.migration import MigrateRequest, MigrationService
from thinvisor.host.state import Action, check_allowed, check_template
from thinvisor.host.tasks import Progress

router = APIRouter(tags=["migration"], responses=ERROR_RESPONSES)

# Moving VMs between hosts is the center's work: it holds the hosts' admin credentials.
Admin = Annotated[User, Depends(require(Permission.ADMIN))]


class TicketOut(BaseModel):
    id: str
    token: str
    port: int
    fingerprint: str
    mode: str


def migrations_of(request: Request) -> MigrationService:
    migration: MigrationService | None = getattr(agent_of(request), "migration", None)
    if migration is None:
        raise Unsupported("this host agent does not serve live migration (no migration port)")
    return migration


@router.post("/migrations/incoming", response_model=TicketOut, status_code=201)
async def prepare_incoming(body: IncomingRequest, request: Request, user: Admin) -> TicketOut:
    """Check that a VM can come to this host, and give the ticket its source needs."""
    ticket = await migrations_of(request).prepare(body)
    return TicketOut.model_validate(ticket.to_dict())


@router.post("/vms/{name}/migrate", status_code=202, responses=ACCEPTED)
async def migrate_vm(
    name: str, body: MigrateRequest, request: Request, user: Admin
) -> JSONResponse:
    """Live-migrate a running VM to the destination of a ticket (a task; cancelling it
    aborts the move and the VM runs on here)."""
    migration = migrations_of(request)
    # Refused at once (no task) when it cannot move: not there, or not running.
    service = migration.service
    entry, spec = service.inventory.get_valid(name)
    check_template(name, spec.template, Action.MIGRATE)
    check_allowed(name, (await service.state_of(entry))[0], Action.MIGRATE)

    async def work(progress: Progress) -> dict[str, Any]:
        return await migration.migrate(name, body, progress)

    return accepted(request, "vm.migrate", f"vm/{name}", user, work, cancellable=True)
