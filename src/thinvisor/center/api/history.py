"""``/tasks`` and ``/events`` of the center: the host agent's routes, each user being shown
only what concerns the part of the inventory they see.

A user who may read the whole inventory is shown every task and event. Anyone else (a
no-access user granted operator on one folder, say) is shown:

- the tasks they started, and the tasks on an object they may read: a task names its
  object by path, and an object that is not (or no longer) there stands for the nearest
  one above it (the host of a VM being created or just deleted). A task they are not
  shown answers 404, as a missing one does.
- the events they caused, the events about themselves (``user/NAME``), the events of the
  tasks they are shown, and the events of an object they may read: a host's and its VMs'
  (``host/NAME``, ``host/NAME/vm/NAME``; every host of that name must be readable) and
  the tree's (``KIND/PATH``, a deleted object again standing for the one above it).
  Events of the center itself and of tags concern the whole inventory: not shown.

At most ``SCAN`` events are looked through per request for such a user; a page may so
hold fewer than ``limit`` events while more follow.

Cancelling a task (a migration: the only tasks that may be) needs the configure
permission on its object, on every object at its path (VMs' names may repeat on a host),
or where none is there any more on the nearest one above it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect

from thinvisor.api.auth import authenticate_ws
from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.api.events import EventOut, event_out, serve_stream
from thinvisor.api.tasks import TaskOut, task_out
from thinvisor.auth import Permission, User
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api.access import Caller, center_of, check, in_thread, visible_ids
from thinvisor.center.inventory import path_segment
from thinvisor.center.models import NodeKind
from thinvisor.errors import InvalidArgument, NotFound
from thinvisor.host.events import Event, SubscriptionDropped
from thinvisor.host.tasks import Task

router = APIRouter(responses=ERROR_RESPONSES)

#: The most events looked through per request for a user who sees part of the inventory.
SCAN = 10_000

_KINDS = frozenset(NodeKind)


class Sight:
    """What one user is shown, as the inventory and their grants stand now: the objects
    they may read, looked up by path and by the names that hosts' events use."""

    def __init__(self, agent: CenterAgent, user: User) -> None:
        self.user = user.name
        self.readable = visible_ids(agent, user)
        self._by_path: dict[str, list[int]] = defaultdict(list)
        self._by_name: dict[str, list[int]] = defaultdict(list)
        if self.readable is not None:
            self._index(agent.inventory.tree(), "/", None)

    def _index(self, entries: list[dict[str, Any]], base: str, host: str | None) -> None:
        for entry in entries:
            path = f"{base.rstrip('/')}/{path_segment(entry['name'])}"
            self._by_path[path].append(entry["id"])
            name = host
            if entry["kind"] == NodeKind.HOST:
                name = f"host/{entry['name']}"
                self._by_name[name].append(entry["id"])
            elif entry["kind"] == NodeKind.VM and host is not None:
                self._by_name[f"{host}/vm/{entry['name']}"].append(entry["id"])
            self._index(entry["children"], path, name)

    def _all_readable(self, ids: list[int]) -> bool:
        return self.readable is None or (bool(ids) and all(i in self.readable for i in ids))

    def path(self, path: str) -> bool:
        """Whether the user may read the object at ``path`` (every one there: VM names
        may repeat), or, without one, the nearest object above it."""
        segments = path.strip("/").split("/")
        while segments:
            found = self._by_path.get("/" + "/".join(segments))
            if found:
                return self._all_readable(found)
            segments.pop()
        return False

    def task(self, task: Task) -> bool:
        """Whether the user is shown ``task``."""
        if self.readable is None or task.user == self.user:
            return True
        return task.object is not None and self.path(task.object)

    def event(self, event: Event) -> bool:
        """Whether the user is shown ``event``."""
        if self.readable is None or (event.user is not None and event.user == self.user):
            return True
        kind, _, rest = (event.object or "").partition("/")
        if kind == "user":
            return rest == self.user
        if kind == "task":
            named = event.data.get("object")
            return isinstance(named, str) and self.path(named)
        if kind == NodeKind.HOST:
            return self._host_event(rest)
        return kind in _KINDS and bool(rest) and self.path(rest)

    def _host_event(self, rest: str) -> bool:
        """``host/NAME``, ``host/NAME/vm/NAME`` (a gone VM: its host) or ``host/PATH``."""
        for name in (f"host/{rest}", f"host/{rest.partition('/vm/')[0]}"):
            if name in self._by_name:
                return self._all_readable(self._by_name[name])
        # A host's path has its datacenter above it: a bare name is a host that is gone.
        return "/" in rest and self.path(rest)


@router.get("/tasks", tags=["tasks"], response_model=list[TaskOut])
async def list_tasks(
    request: Request,
    user: Caller,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    object: str | None = None,
) -> list[TaskOut]:
    """Recent tasks that the user is shown, newest first."""
    agent = center_of(request)

    def read() -> list[Task]:
        sight = Sight(agent, user)
        scan = limit if sight.readable is None else SCAN
        found = agent.tasks.list(limit=scan, object=object)
        return [t for t in found if sight.task(t)][:limit]

    return [task_out(t) for t in await in_thread(read)]


@router.get("/tasks/{task_id}", tags=["tasks"], response_model=TaskOut)
async def get_task(task_id: str, request: Request, user: Caller) -> TaskOut:
    """A task (404 if the user is not shown it)."""
    agent = center_of(request)

    def read() -> Task:
        task = agent.tasks.get(task_id)
        if not Sight(agent, user).task(task):
            raise NotFound(f"task {task_id!r} does not exist")  # the message of a missing one
        return task

    return task_out(await in_thread(read))


@router.post("/tasks/{task_id}/cancel", tags=["tasks"], response_model=TaskOut, status_code=202)
async def cancel_task(task_id: str, request: Request, user: Caller) -> TaskOut:
    """Cancel a running task that can be (``cancellable``: a migration, until the VM has
    switched over): it undoes what it did and ends as ``cancelled``; follow it with
    ``GET /tasks/{id}``. 404 if the user is not shown it, 403 without configure on its
    object, 409 if it cannot be cancelled or has finished."""
    agent = center_of(request)

    def read() -> Task:
        task = agent.tasks.get(task_id)
        if not Sight(agent, user).task(task):
            raise NotFound(f"task {task_id!r} does not exist")  # the message of a missing one
        for node_id in _objects_at(agent, task.object):
            check(agent, user, node_id, Permission.CONFIGURE)
        return task

    task = await in_thread(read)
    return task_out(agent.tasks.cancel(task.id))


def _objects_at(agent: CenterAgent, path: str | None) -> list[int | None]:
    """The ids of the objects at ``path``, or where there is none of the nearest object
    above it; ``[None]`` (the root) where there is none at all."""
    segments = [] if path is None else path.strip("/").split("/")
    while segments:
        here = "/" + "/".join(segments)
        try:
            parent = None if len(segments) == 1 else agent.inventory.resolve(here.rsplit("/", 1)[0])
            siblings = agent.inventory.children(None if parent is None else parent.id)
        except (NotFound, InvalidArgument):
            siblings = []
        found: list[int | None] = [n.id for n in siblings if n.path == here]
        if found:
            return found
        segments.pop()
    return [None]


@router.get("/events", tags=["events"], response_model=list[EventOut])
async def list_events(
    request: Request,
    user: Caller,
    since: Annotated[int | None, Query(ge=0, description="only events after this id")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    object: str | None = None,
    kind: Annotated[str | None, Query(description="a kind or a prefix, like vm.")] = None,
) -> list[EventOut]:
    """Events that the user is shown, oldest first."""
    agent = center_of(request)

    def read() -> list[Event]:
        sight = Sight(agent, user)
        scan = limit if sight.readable is None else SCAN
        found = agent.events.list(since=since, limit=scan, object=object, kind_prefix=kind)
        shown = [e for e in found if sight.event(e)]
        # From ``since``: the first ``limit`` after it; else the newest ``limit``.
        return shown[:limit] if since is not None else shown[-limit:]

    return [event_out(e) for e in await in_thread(read)]


@router.websocket("/events/stream")
async def stream_events(websocket: WebSocket, since: int | None = None) -> None:
    """Every new event the user is shown, as a JSON text message; ``since`` replays the
    ones after that id. The stream ends when the client goes, even while no event comes."""
    user = await authenticate_ws(websocket)
    if user is None:
        return
    await websocket.accept()
    await serve_stream(websocket, _send_events(websocket, user, since))


async def _send_events(
    websocket: WebSocket, user: User, since: int | None
) -> tuple[int, str] | None:
    """Send the events the user is shown until the log ends the subscription: the close
    code and reason then; None if the client went."""
    agent = center_of(websocket)

    def shown(events: list[Event]) -> list[Event]:
        sight = Sight(agent, user)
        return [e for e in events if sight.event(e)]

    try:
        async with agent.events.subscribe() as subscription:
            if since is not None:
                past = agent.events.list(since=since, limit=SCAN)
                for event in await in_thread(shown, past):
                    await websocket.send_json(event_out(event).model_dump())
            async for event in subscription:
                # Asked afresh for each event: grants and the inventory change meanwhile.
                for new in await in_thread(shown, [event]):
                    await websocket.send_json(event_out(new).model_dump())
    except WebSocketDisconnect:
        return None
    except SubscriptionDropped as exc:
        return 1013, str(exc)
    return 1001, "the center is stopping"
