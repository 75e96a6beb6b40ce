"""A running VM's block graph and block jobs, through QMP.

A disk starts as the nodes ``<disk>-file`` and ``<disk>-fmt`` (see ``argv.disk_nodes``),
with QEMU opening any backing files itself. Live snapshots put overlays on top
(``<disk>-o<n>``) and a live move swaps the whole chain for a new node, so the node a
disk's device uses now is looked up, never assumed. Files are matched by their real
path: QEMU keeps a backing file's name as composed from the overlay's directory.

Block jobs run for long; the QMP socket serves one client at a time, so a job is
started in one short session and then watched in short sessions of its own, leaving the
socket free for state queries in between.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinvisor.errors import QemuError
from thinvisor.host.engine.qmp import Monitor

JOB_POLL_S = 0.1
JobReport = Callable[[int, int], None]  # bytes done, bytes in all
PERIPHERAL = "/machine/peripheral/"
# Node names thinvisor gives; every other node is QEMU's (a backing file it opened).
OWN_SUFFIXES = ("-file", "-fmt")


@dataclass(frozen=True)
class BlockNode:
    name: str
    file: str  # the image's path (its protocol node's file name)
    driver: str

    @property
    def real(self) -> str:
        return os.path.realpath(self.file)


def is_own(node: str, disk: str) -> bool:
    """Whether thinvisor added ``node`` for ``disk`` (and so must delete it itself)."""
    return node in (f"{disk}-file", f"{disk}-fmt") or node.startswith(f"{disk}-o")


async def top_node(mon: Monitor, device: str) -> str:
    """The node the guest device ``device`` reads and writes."""
    for entry in await mon.command("query-block"):
        qdev = str(entry.get("qdev", ""))
        if qdev == PERIPHERAL + device or qdev.startswith(f"{PERIPHERAL}{device}/"):
            inserted = entry.get("inserted")
            if inserted:
                return str(inserted["node-name"])
    raise QemuError(f"vm {mon.vm!r}: no block device {device!r}")


async def chain_nodes(mon: Monitor, device: str) -> list[BlockNode]:
    """The image nodes of a device's chain, top first.

    Nodes whose backing was set by QMP have ``json:`` file names, so the chain is
    followed through the block graph's ``backing`` edges, and each image's path is its
    protocol node's (the ``file`` edge).
    """
    graph = await mon.command("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    edges: dict[tuple[int, str], int] = {
        (e["parent"], e["name"]): e["child"] for e in graph["edges"]
    }
    files = {
        n["node-name"]: (str(n["file"]), str(n["drv"]))
        for n in await mon.command("query-named-block-nodes", flat=True)
    }
    ids = {name: node_id for node_id, name in names.items()}
    chain: list[BlockNode] = []
    current: int | None = ids.get(await top_node(mon, device))
    while current is not None and len(chain) < 256:
        name = names[current]
        protocol = edges.get((current, "file"))
        path = files[names[protocol]][0] if protocol is not None else files[name][0]
        chain.append(BlockNode(name, path, files[name][1]))
        current = edges.get((current, "backing"))
    return chain


def node_of(chain: list[BlockNode], path: Path) -> BlockNode | None:
    real = os.path.realpath(path)
    return next((n for n in chain if n.real == real), None)


async def run_job(
    vm: str,
    socket: Path,
    job_id: str,
    progress: JobReport | None = None,
    *,
    on_ready: Callable[[], Any] | None = None,
) -> None:
    """Watch a job started with ``auto-dismiss: false`` until it ends; dismiss it.

    A mirror job becomes *ready* and waits: ``on_ready`` (an async callable) runs then,
    and the job is told to complete. A job that ends in error raises ``QemuError``; a
    cancellation of the caller cancels the job.
    """
    completing = False
    try:
        while True:
            async with Monitor(vm, socket) as mon:
                job = next((j for j in await mon.command("query-jobs") if j["id"] == job_id), None)
                if job is None:
                    raise QemuError(f"vm {vm!r}: block job {job_id} vanished")
                if progress is not None:
                    progress(int(job.get("current-progress", 0)), int(job.get("total-progress", 0)))
                status = job["status"]
                if status == "concluded":
                    await mon.command("job-dismiss", id=job_id)
                    if job.get("error"):
                        raise QemuError(f"vm {vm!r}: block job {job_id}: {job['error']}")
                    return
                if status == "ready" and not completing:
                    if on_ready is not None:
                        await on_ready()
                    await mon.command("job-complete", id=job_id)
                    completing = True
            await asyncio.sleep(JOB_POLL_S)
    except BaseException:
        await _abandon(vm, socket, job_id)
        raise


async def _abandon(vm: str, socket: Path, job_id: str) -> None:
    """Cancel and dismiss a job whose watcher failed or was cancelled (best effort)."""
    try:
        async with Monitor(vm, socket) as mon:
            jobs = {j["id"]: j for j in await mon.command("query-jobs")}
            job = jobs.get(job_id)
            if job is None:
                return
            if job["status"] != "concluded":
                await mon.command("job-cancel", id=job_id)
                for _ in range(100):
                    jobs = {j["id"]: j for j in await mon.command("query-jobs")}
                    if jobs.get(job_id, {}).get("status") in (None, "concluded"):
                        break
                    await asyncio.sleep(JOB_POLL_S)
            if job_id in jobs:
                await mon.command("job-dismiss", id=job_id)
    except QemuError:
        pass


async def delete_own_nodes(mon: Monitor, disk: str, names: list[str]) -> None:
    """Delete nodes thinvisor added for ``disk`` that nothing uses any more, top first
    (a format node before its protocol node)."""
    present = {n["node-name"] for n in await mon.command("query-named-block-nodes", flat=True)}
    for name in names:
        if is_own(name, disk) and name in present:
            await mon.blockdev_del(name)
            present.discard(name)
        file_node = name.removesuffix("-fmt") + "-file" if name.endswith("-fmt") else None
        if file_node and file_node in present:
            await mon.blockdev_del(file_node)
            present.discard(file_node)
