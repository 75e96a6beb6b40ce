"""``/events``: the host's history, listed, and streamed live over a WebSocket."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, WebSocket, WebSocketDisconnect
from pydantic import BaseModel

from thinvisor.api.auth import agent_of, require, require_ws
from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.auth import Permission, User
from thinvisor.host.events import Event, SubscriptionDropped

router = APIRouter(prefix="/events", tags=["events"], responses=ERROR_RESPONSES)


class EventOut(BaseModel):
    id: int
    time: str
    kind: str
    object: str | None
    user: str | None
    message: str
    data: dict[str, Any]


def event_out(event: Event) -> EventOut:
    return EventOut.model_validate(event.to_dict())


@router.get("", response_model=list[EventOut])
async def list_events(
    request: Request,
    user: Annotated[User, Depends(require(Permission.READ))],
    since: Annotated[int | None, Query(ge=0, description="only events after this id")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    object: str | None = None,
    kind: Annotated[str | None, Query(description="a kind or a prefix, like vm.")] = None,
) -> list[EventOut]:
    """Events, oldest first."""
    found = agent_of(request).events.list(since=since, limit=limit, object=object, kind_prefix=kind)
    return [event_out(e) for e in found]


@router.websocket("/stream")
async def stream(websocket: WebSocket, since: int | None = None) -> None:
    """Every new event as a JSON text message; ``since`` replays the ones after that id."""
    if await require_ws(websocket, Permission.READ) is None:
        return
    await websocket.accept()
    events = agent_of(websocket).events
    try:
        async with events.subscribe() as subscription:
            if since is not None:
                for past in events.list(since=since, limit=10_000):
                    await websocket.send_json(event_out(past).model_dump())
            async for event in subscription:
                await websocket.send_json(event_out(event).model_dump())
    except WebSocketDisconnect:
        return
    except SubscriptionDropped as exc:
        await websocket.close(code=1013, reason=str(exc))
        return
    await websocket.close(code=1001, reason="the agent is stopping")
