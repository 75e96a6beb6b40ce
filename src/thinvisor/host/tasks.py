"""Tasks: operations that take time run in the background and are watched by id.

``TaskManager.submit`` returns a queued ``Task`` at once (the API answers 202 with it)
and runs the work as an asyncio task. The work reports progress through ``Progress``;
its return value becomes the task's ``result`` and an exception its ``error``, in the
same ``{"error": code, "message": text}`` form the API uses. Tasks live in memory only:
they do not survive an agent restart.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import dataclasses
import enum
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel

from thinvisor.errors import Busy, NotFound, ThinvisorError, Unsupported
from thinvisor.host.events import EventLog, iso_time

logger = logging.getLogger(__name__)


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"


FINISHED = frozenset({TaskState.SUCCESS, TaskState.ERROR})


@dataclass
class Task:
    id: str
    kind: str
    object: str | None
    user: str | None
    state: TaskState = TaskState.QUEUED
    progress: int = 0
    message: str | None = None
    result: Any = None
    error: dict[str, str] | None = None
    cancellable: bool = False
    created: str | None = None
    started: str | None = None
    finished: str | None = None

    @property
    def done(self) -> bool:
        return self.state in FINISHED

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state"] = str(self.state)
        return d


class Progress:
    """What a task's work holds to report how far it is."""

    def __init__(self, task: Task) -> None:
        self._task = task

    def update(self, percent: int, message: str | None = None) -> None:
        """Set the percentage done (clamped to 0-100) and, if given, the current step."""
        self._task.progress = max(0, min(100, int(percent)))
        if message is not None:
            self._task.message = message


Work = Callable[[Progress], Awaitable[Any]]


def error_code(exc: ThinvisorError) -> str:
    """The API's code for an error: its class name in snake_case
    (``InvalidArgument`` -> ``invalid_argument``)."""
    name = type(exc).__name__
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def plain(value: Any) -> Any:
    """``value`` as JSON-able data: pydantic models and objects with ``to_dict()``
    converted, containers converted item by item."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if callable(getattr(value, "to_dict", None)):
        return plain(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    logger.warning("task result of type %s is not JSON data; using its str()", type(value))
    return str(value)


class TaskManager:
    """Runs tasks, keeps the unfinished ones and the last ``keep`` finished ones."""

    def __init__(self, events: EventLog | None = None, *, keep: int = 500) -> None:
        self.events = events
        self.keep = keep
        self._tasks: dict[str, Task] = {}  # in submission order
        self._finished: collections.deque[str] = collections.deque()
        self._done: dict[str, asyncio.Event] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def submit(
        self,
        kind: str,
        object: str | None,
        user: str | None,
        work: Work,
        *,
        cancellable: bool = False,
    ) -> Task:
        """Start ``work`` in the background; return its task, still queued.

        A ``cancellable`` task's work must undo what it did when cancelled (a migration
        leaves the VM running where it was); other tasks cannot be cancelled, because
        stopping them half-way would leave what they did half done."""
        if self._closed:
            raise Busy("the agent is shutting down")
        task = Task(str(uuid.uuid4()), kind, object, user, cancellable=cancellable, created=_now())
        self._tasks[task.id] = task
        self._done[task.id] = asyncio.Event()
        self._running[task.id] = asyncio.create_task(self._run(task, work), name=f"task {task.id}")
        return task

    async def _run(self, task: Task, work: Work) -> None:
        task.state = TaskState.RUNNING
        task.started = _now()
        self._emit(task, "task.started", f"{_title(task)} started")
        try:
            result = await work(Progress(task))
        except asyncio.CancelledError:
            self._finish(task, error={"error": "cancelled", "message": "task cancelled"})
            raise
        except ThinvisorError as exc:
            self._finish(task, error={"error": error_code(exc), "message": str(exc)})
        except Exception:
            logger.exception("task %s (%s) failed", task.id, _title(task))
            message = f"internal error; see the agent log (task {task.id})"
            self._finish(task, error={"error": "internal", "message": message})
        else:
            self._finish(task, result=result)
        finally:
            self._running.pop(task.id, None)

    def _finish(
        self, task: Task, *, result: Any = None, error: dict[str, str] | None = None
    ) -> None:
        if error is None:
            try:
                task.result = plain(result)
            except Exception:
                logger.exception("task %s: cannot convert its result", task.id)
            task.progress = 100
            task.state = TaskState.SUCCESS
        else:
            task.error = error
            task.state = TaskState.ERROR
        task.finished = _now()
        outcome = "succeeded" if error is None else f"failed: {error['message']}"
        data = {"state": str(task.state), "error": error}
        self._emit(task, "task.finished", f"{_title(task)} {outcome}", data)
        self._done[task.id].set()
        self._finished.append(task.id)
        while len(self._finished) > self.keep:
            old = self._finished.popleft()
            del self._tasks[old]
            del self._done[old]

    def _emit(
        self, task: Task, kind: str, message: str, extra: dict[str, Any] | None = None
    ) -> None:
        if self.events is not None:
            data = {"task": task.id, "kind": task.kind, "object": task.object, **(extra or {})}
            self.events.emit(kind, message, object=f"task/{task.id}", user=task.user, data=data)

    def get(self, id: str) -> Task:
        task = self._tasks.get(id)
        if task is None:
            raise NotFound(f"task {id!r} does not exist")
        return task

    def list(self, limit: int = 50, object: str | None = None) -> builtins.list[Task]:
        """Tasks, newest first, optionally only those on ``object``."""
        found: builtins.list[Task] = []
        for task in reversed(self._tasks.values()):
            if len(found) >= limit:
                break
            if object is None or task.object == object:
                found.append(task)
        return found

    def cancel(self, id: str) -> Task:
        """Ask a cancellable task's work to stop; it finishes as ``cancelled`` once it has
        undone what it did (``wait`` for that)."""
        task = self.get(id)
        if not task.cancellable:
            raise Unsupported(f"task {id} ({task.kind}) cannot be cancelled")
        running = self._running.get(id)
        if task.done or running is None:
            raise Busy(f"task {id} has already finished ({task.state})")
        running.cancel()
        return task

    async def wait(self, id: str, timeout: float | None = None) -> Task:
        """The task once finished, or as it stands when ``timeout`` seconds pass."""
        task = self.get(id)
        done = self._done.get(id)
        if done is not None and not task.done:
            try:
                async with asyncio.timeout(timeout):
                    await done.wait()
            except TimeoutError:
                pass
        return task

    async def close(self) -> None:
        """Refuse new tasks and cancel the running ones (agent shutdown)."""
        self._closed = True
        running = builtins.list(self._running.values())
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        # Work cancelled before it began never ran ``_run``: finish its task here.
        for task in builtins.list(self._tasks.values()):
            if not task.done:
                self._finish(task, error={"error": "cancelled", "message": "task cancelled"})
        self._running.clear()


def _now() -> str:
    return iso_time(time.time())


def _title(task: Task) -> str:
    return f"{task.kind} {task.object}" if task.object else task.kind
