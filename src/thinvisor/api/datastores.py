"""``/datastores``: adding and removing, space, browsing, downloads and uploads. Routes
parse, authorise, translate.

Uploads are the raw request body (``PUT``, not multipart), streamed to disk; while one
runs it is a task, so that other clients can follow its progress.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from thinvisor.api.auth import agent_of, require
from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.auth import Permission, User
from thinvisor.errors import InsufficientResources, InvalidArgument
from thinvisor.host.agent import HostAgent
from thinvisor.host.datastores import DatastoreService
from thinvisor.host.tasks import Progress, Task
from thinvisor.model.base import StrictModel
from thinvisor.storage import datastore as storage
from thinvisor.storage.datastore import Datastore, FileEntry, TooLarge

router = APIRouter(prefix="/datastores", tags=["datastores"], responses=ERROR_RESPONSES)

Reader = Annotated[User, Depends(require(Permission.READ))]
Configurer = Annotated[User, Depends(require(Permission.CONFIGURE))]


class DatastoreAdd(StrictModel):
    """An existing directory to use as a datastore (a mounted NFS or CIFS share too)."""

    name: str = Field(description="letters, digits, '.', '_' and '-', as a VM's name")
    path: str = Field(description="an absolute path to a directory the agent can write")


class DirListing(BaseModel):
    datastore: str
    path: str = Field(description="the directory, relative to the datastore ('' is its root)")
    entries: list[FileEntry]


class Uploaded(FileEntry):
    """The file stored, and the task that recorded the upload."""

    task: str


FILE_OR_LISTING: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a directory's listing (JSON), or a file's content",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _root(agent: HostAgent, ds: str) -> Path:
    return agent.config.datastore(ds).path


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise InvalidArgument("Content-Length", "must be a byte count")
    return int(value)


async def _check_space(root: Path, expected: int | None, limit: int) -> None:
    """Refuse an upload before reading it when its announced size cannot fit."""
    if expected is None:
        return
    if expected > limit:
        raise TooLarge(f"the upload exceeds the limit of {limit} bytes")
    free = await asyncio.to_thread(storage.free_bytes, root)
    if free is not None and expected > free:
        raise InsufficientResources(f"the datastore has only {free} bytes free")


Report = Callable[[int], None]
Upload = Callable[[Report], Awaitable[FileEntry]]


def _reporter(progress: Progress, expected: int | None) -> Report:
    def report(received: int) -> None:
        percent = min(99, received * 100 // expected) if expected else 0
        progress.update(percent, f"{received} bytes received")

    return report


async def _tracked_upload(
    request: Request, task_object: str, user: User, upload: Upload, expected: int | None
) -> tuple[FileEntry, Task]:
    """Run ``upload(report)`` in the request, mirrored by a task that others can watch."""
    agent = agent_of(request)
    done: asyncio.Future[FileEntry] = asyncio.get_running_loop().create_future()

    async def work(_: Progress) -> FileEntry:
        return await done

    task = agent.tasks.submit("datastore.upload", task_object, user.name, work)
    try:
        entry = await upload(_reporter(Progress(task), expected))
    except ClientDisconnect:
        error = InvalidArgument("body", "the client disconnected before the upload ended")
        if not done.done():
            done.set_exception(error)
        raise error from None
    except Exception as exc:
        if not done.done():
            done.set_exception(exc)
        raise
    except BaseException:
        done.cancel()
        raise
    if not done.done():
        done.set_result(entry)
    await agent.tasks.wait(task.id, timeout=5)
    return entry, task


def _datastores(request: Request) -> DatastoreService:
    return agent_of(request).service.datastores


@router.get("", response_model=list[Datastore])
async def list_datastores(request: Request, user: Reader) -> list[Datastore]:
    """Every datastore with its capacity, free space, filesystem, and the space its VMs
    take (provisioned and used, in all and per VM)."""
    return await _datastores(request).list_datastores()


@router.post("", status_code=201, response_model=Datastore)
async def add_datastore(
    body: DatastoreAdd, request: Request, response: Response, user: Configurer
) -> Datastore:
    """Add an existing directory as a datastore: absolute, writable by the agent, and
    neither inside nor containing another datastore. Kept across agent restarts."""
    info = await _datastores(request).add_datastore(body.name, body.path)
    response.headers["Location"] = f"/api/v1/datastores/{quote(info.name)}"
    return info


@router.get("/{ds}", response_model=Datastore)
async def get_datastore(ds: str, request: Request, user: Reader) -> Datastore:
    return await _datastores(request).get_datastore(ds)


@router.delete("/{ds}", status_code=204, response_class=Response)
async def remove_datastore(ds: str, request: Request, user: Configurer) -> Response:
    """Remove an added datastore (not one of host.toml's), refused while a VM uses it.
    Its files are not deleted."""
    await _datastores(request).remove_datastore(ds)
    return Response(status_code=204)


async def _browse(request: Request, ds: str, path: str) -> DirListing | FileResponse:
    root = _root(agent_of(request), ds)
    target = await asyncio.to_thread(storage.safe_path, root, path)
    if await asyncio.to_thread(target.is_dir):
        entries = await asyncio.to_thread(storage.list_dir, root, path)
        return DirListing(datastore=ds, path=storage.relative(root, target), entries=entries)
    file, st = await asyncio.to_thread(storage.open_file, root, path)
    return FileResponse(
        file.resolve(), media_type="application/octet-stream", filename=file.name, stat_result=st
    )


@router.get("/{ds}/files", response_model=DirListing, responses=FILE_OR_LISTING)
async def list_root(ds: str, request: Request, user: Reader) -> DirListing | FileResponse:
    """The datastore's top directory."""
    return await _browse(request, ds, "")


@router.get("/{ds}/files/{path:path}", response_model=DirListing, responses=FILE_OR_LISTING)
async def get_file(ds: str, path: str, request: Request, user: Reader) -> DirListing | FileResponse:
    """A directory's listing, or a file's content."""
    return await _browse(request, ds, path)


@router.put(
    "/{ds}/files/{path:path}",
    status_code=201,
    response_model=Uploaded,
    openapi_extra=UPLOAD_BODY,
)
async def upload_file(
    ds: str,
    path: str,
    request: Request,
    response: Response,
    user: Configurer,
    overwrite: bool = False,
) -> Uploaded:
    """Store the request body as a file; missing parent directories are created.

    Not inside a VM's directory (VM actions manage those). An existing file is
    replaced only with ``overwrite=true``. The upload is a task while it runs.
    """
    agent = agent_of(request)
    root = _root(agent, ds)
    limit = agent.config.api.upload_max_bytes
    expected = _content_length(request)
    await asyncio.to_thread(storage.upload_target, root, path, overwrite=overwrite)
    await _check_space(root, expected, limit)

    async def upload(report: Report) -> FileEntry:
        return await storage.upload(
            root, path, request.stream(), max_bytes=limit, overwrite=overwrite, progress=report
        )

    entry, task = await _tracked_upload(request, f"datastore/{ds}", user, upload, expected)
    agent.events.emit(
        "datastore.file_uploaded",
        f"{entry.path} uploaded to datastore {ds} ({entry.size} bytes)",
        object=f"datastore/{ds}",
        user=user.name,
        data={"path": entry.path, "size": entry.size, "task": task.id},
    )
    response.headers["Location"] = f"/api/v1/datastores/{quote(ds)}/files/{quote(entry.path)}"
    return Uploaded(**entry.model_dump(), task=task.id)


@router.delete("/{ds}/files/{path:path}", status_code=204, response_class=Response)
async def delete_file(ds: str, path: str, request: Request, user: Configurer) -> Response:
    """Delete a file, a link or an empty directory (not inside a VM's directory)."""
    agent = agent_of(request)
    entry = await asyncio.to_thread(storage.delete, _root(agent, ds), path)
    agent.events.emit(
        "datastore.file_deleted",
        f"{entry.path} deleted from datastore {ds}",
        object=f"datastore/{ds}",
        user=user.name,
        data={"path": entry.path, "kind": entry.kind},
    )
    return Response(status_code=204)


@router.post("/{ds}/dirs/{path:path}", status_code=201, response_model=FileEntry)
async def make_dir(ds: str, path: str, request: Request, user: Configurer) -> FileEntry:
    """Create a directory, and its missing parents."""
    agent = agent_of(request)
    entry = await asyncio.to_thread(storage.make_dir, _root(agent, ds), path)
    agent.events.emit(
        "datastore.dir_created",
        f"directory {entry.path} created in datastore {ds}",
        object=f"datastore/{ds}",
        user=user.name,
        data={"path": entry.path},
    )
    return entry
