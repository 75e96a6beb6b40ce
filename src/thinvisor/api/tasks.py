"""``/tasks``: long operations answer 202 with a task; here is where they are followed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from thinvisor.api.auth import require
from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.auth import Permission, User
from thinvisor.host.tasks import Progress, Task, TaskManager

router = APIRouter(prefix="/tasks", tags=["tasks"], responses=ERROR_RESPONSES)

Reader = Annotated[User, Depends(require(Permission.READ))]
# Cancelling is allowed to whoever may start the tasks that can be cancelled (migrations).
Operator = Annotated[User, Depends(require(Permission.CONFIGURE))]


class TaskError(BaseModel):
    error: str
    message: str


class TaskOut(BaseModel):
    id: str
    kind: str
    object: str | None
    user: str | None
    state: str
    progress: int
    message: str | None
    result: Any = None
    error: TaskError | None = None
    cancellable: bool = False
    created: str | None
    started: str | None
    finished: str | None


def task_out(task: Task) -> TaskOut:
    return TaskOut.model_validate(task.to_dict())


def tasks_of(request: Request) -> TaskManager:
    """The app's task manager (the host agent's, or the center's)."""
    tasks: TaskManager = request.app.state.agent.tasks
    return tasks


def accepted(
    request: Request,
    kind: str,
    obj: str,
    user: User,
    work: Callable[[Progress], Awaitable[Any]],
    *,
    cancellable: bool = False,
) -> JSONResponse:
    """Start ``work`` as a task and answer 202 with it."""
    task = tasks_of(request).submit(kind, obj, user.name, work, cancellable=cancellable)
    return accepted_task(task)


def accepted_task(task: Task) -> JSONResponse:
    """Answer 202 with a task already started."""
    body = task_out(task).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": f"/api/v1/tasks/{task.id}"})


ACCEPTED: dict[int | str, dict[str, Any]] = {202: {"model": TaskOut, "description": "a task"}}


@router.get("", response_model=list[TaskOut])
async def list_tasks(
    request: Request,
    user: Reader,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    object: str | None = None,
) -> list[TaskOut]:
    """Recent tasks, newest first."""
    return [task_out(t) for t in tasks_of(request).list(limit=limit, object=object)]


@router.get("/{task_id}", response_model=TaskOut)
async def get_task(task_id: str, request: Request, user: Reader) -> TaskOut:
    return task_out(tasks_of(request).get(task_id))


@router.post("/{task_id}/cancel", response_model=TaskOut, status_code=202)
async def cancel_task(task_id: str, request: Request, user: Operator) -> TaskOut:
    """Cancel a running task that can be (``cancellable``): its work undoes what it did
    and the task ends as ``cancelled``; follow it with ``GET /tasks/{id}``."""
    return task_out(tasks_of(request).cancel(task_id))
