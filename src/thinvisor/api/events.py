"""``/events``: the agent's history, listed, and streamed live over a WebSocket.

The host agent and the center (whose log merges its hosts' events) both serve it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, WebSocket, WebSocketDisconnect
from pydantic import BaseModel

from thinvisor.api.auth import auth_agent_of, require, require_ws
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
    found = auth_agent_of(request).events.list(
        since=since, limit=limit, object=object, kind_prefix=kind
    )
    return [event_out(e) for e in found]


@router.websocket("/stream")
async def stream(websocket: WebSocket, since: int | None = None) -> None:
    """Every new event as a JSON text message; ``since`` replays the ones after that id.

    The stream ends when the client goes, even while no event comes: a subscription
    left waiting would keep the server from stopping."""
    if await require_ws(websocket, Permission.READ) is None:
        return
    await websocket.accept()
    await serve_stream(websocket, _send_events(websocket, since))


async def serve_stream(
    websocket: WebSocket, sender: Coroutine[Any, Any, tuple[int, str] | None]
) -> None:
    """Run ``sender`` until it ends or the client goes, whichever is first; if the
    sender ends with a close code and reason, close the socket with them."""
    sender_task = asyncio.create_task(sender, name="events-to-client")
    watcher = asyncio.create_task(_until_disconnect(websocket), name="events-client")
    try:
        await asyncio.wait([sender_task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender_task, watcher):
            task.cancel()
        await asyncio.wait([sender_task, watcher])
    close = None if sender_task.cancelled() else sender_task.result()
    if close is not None and not watcher.done():
        await websocket.close(code=close[0], reason=close[1])


async def _send_events(websocket: WebSocket, since: int | None) -> tuple[int, str] | None:
    """Send events until the log ends the subscription: the close code and reason then;
    None if the client went."""
    events = auth_agent_of(websocket).events
    try:
        async with events.subscribe() as subscription:
            if since is not None:
                for past in events.list(since=since, limit=10_000):
                    await websocket.send_json(event_out(past).model_dump())
            async for event in subscription:
                await websocket.send_json(event_out(event).model_dump())
    except WebSocketDisconnect:
        return None
    except SubscriptionDropped as exc:
        return 1013, str(exc)
    return 1001, "the agent is stopping"


async def _until_disconnect(websocket: WebSocket) -> None:
    """Wait for the client to go; what it sends is ignored."""
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass
