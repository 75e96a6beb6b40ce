"""Tasks: background work with progress, a result or an error, and events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from thinvisor.errors import InvalidArgument, InvalidState, NotFound, QemuError
from thinvisor.host.events import EventLog
from thinvisor.host.tasks import Progress, Task, TaskManager, TaskState, error_code


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def events(tmp_path: Path) -> Iterator[EventLog]:
    with EventLog(tmp_path / "events.jsonl") as log:
        yield log


async def returns(value: Any) -> Any:
    tasks = TaskManager()
    task = tasks.submit("vm.clone", "vm/demo", "alice", lambda p: _value(value))
    return (await tasks.wait(task.id, timeout=5)).result


async def _value(value: Any) -> Any:
    return value


async def fails(exc: Exception) -> Task:
    async def work(progress: Progress) -> None:
        raise exc

    tasks = TaskManager()
    task = tasks.submit("vm.suspend", "vm/demo", "alice", work)
    return await tasks.wait(task.id, timeout=5)


def test_error_code() -> None:
    assert error_code(InvalidArgument("name", "empty")) == "invalid_argument"
    assert error_code(NotFound("x")) == "not_found"
    assert error_code(InvalidState("demo", "stopped", "suspend")) == "invalid_state"
    assert error_code(QemuError("x")) == "qemu_error"


def test_success_with_progress() -> None:
    seen: list[tuple[int, str | None]] = []

    async def main() -> None:
        tasks = TaskManager()
        gate = asyncio.Event()

        async def work(progress: Progress) -> dict[str, int]:
            progress.update(30, "copying disk")
            await gate.wait()
            progress.update(250)
            return {"bytes": 42}

        task = tasks.submit("vm.clone", "vm/demo", "alice", work)
        assert task.state == TaskState.QUEUED and task.created and task.started is None
        await asyncio.sleep(0)
        seen.append((task.progress, task.message))
        assert tasks.get(task.id).state == TaskState.RUNNING and task.started
        gate.set()
        assert await tasks.wait(task.id, timeout=5) is task
        d = task.to_dict()
        assert d["state"] == "success" and d["result"] == {"bytes": 42}
        assert d["progress"] == 100 and d["error"] is None and d["finished"]
        assert (d["id"], d["kind"], d["object"], d["user"]) == (
            task.id, "vm.clone", "vm/demo", "alice",
        )  # fmt: skip

    run(main())
    assert seen == [(30, "copying disk")]


def test_progress_is_clamped() -> None:
    task = Task("t", "vm.clone", "vm/demo", None)
    Progress(task).update(-5)
    assert task.progress == 0
    Progress(task).update(150, "almost")
    assert (task.progress, task.message) == (100, "almost")


def test_results_become_plain_data() -> None:
    class Model(BaseModel):
        path: Path
        n: int

    @dataclass
    class Info:
        name: str

        def to_dict(self) -> dict[str, Any]:
            return {"name": self.name.upper()}

    assert run(returns(Model(path=Path("/x"), n=1))) == {"path": "/x", "n": 1}
    assert run(returns([Info("a"), TaskState.ERROR, (1, 2)])) == [{"name": "A"}, "error", [1, 2]]
    assert run(returns(None)) is None


def test_thinvisor_error_becomes_the_task_error() -> None:
    task = run(fails(InvalidState("demo", "stopped", "suspend")))
    assert task.state == TaskState.ERROR
    assert task.error == {
        "error": "invalid_state",
        "message": "vm 'demo': cannot suspend while stopped",
    }
    assert task.result is None and task.finished


def test_other_exception_is_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="thinvisor.host.tasks"):
        task = run(fails(KeyError("secret detail")))
    assert task.error == {
        "error": "internal",
        "message": f"internal error; see the agent log (task {task.id})",
    }
    assert "secret detail" not in str(task.to_dict())
    [record] = caplog.records
    assert task.id in record.getMessage() and record.exc_info is not None


def test_get_and_list() -> None:
    async def main() -> None:
        tasks = TaskManager()
        a = tasks.submit("vm.clone", "vm/a", None, lambda p: _value(1))
        b = tasks.submit("vm.clone", "vm/b", None, lambda p: _value(2))
        c = tasks.submit("vm.suspend", "vm/a", None, lambda p: _value(3))
        assert tasks.get(b.id) is b
        with pytest.raises(NotFound):
            tasks.get("nope")
        assert tasks.list() == [c, b, a]
        assert tasks.list(limit=2) == [c, b]
        assert tasks.list(object="vm/a") == [c, a]
        await tasks.close()

    run(main())


def test_keeps_the_last_finished_tasks_and_every_running_one() -> None:
    async def main() -> None:
        tasks = TaskManager(keep=3)
        gate = asyncio.Event()

        async def blocked(progress: Progress) -> None:
            await gate.wait()

        running = tasks.submit("vm.migrate", "vm/long", None, blocked)
        done = [tasks.submit("vm.clone", f"vm/{i}", None, lambda p: _value(0)) for i in range(6)]
        await tasks.wait(done[-1].id, timeout=5)  # they run in order: all are done
        assert all(t.state == TaskState.SUCCESS for t in done)
        assert tasks.list(limit=100) == [*reversed(done[3:]), running]
        with pytest.raises(NotFound):
            tasks.get(done[0].id)
        gate.set()
        await tasks.wait(running.id, timeout=5)
        # Now the newest finished task, it stays; the oldest finished one goes.
        assert tasks.list(limit=100) == [*reversed(done[4:]), running]

    run(main())


def test_wait_times_out_with_the_task_as_it_stands() -> None:
    async def main() -> None:
        tasks = TaskManager()

        async def slow(progress: Progress) -> None:
            progress.update(10, "waiting")
            await asyncio.sleep(60)

        task = tasks.submit("vm.clone", "vm/demo", None, slow)
        got = await tasks.wait(task.id, timeout=0.05)
        assert got is task and got.state == TaskState.RUNNING and got.progress == 10
        with pytest.raises(NotFound):
            await tasks.wait("nope", timeout=0.05)
        await tasks.close()

    run(main())


def test_close_cancels_running_and_queued_work(events: EventLog) -> None:
    cleaned: list[str] = []

    async def main() -> tuple[Task, Task]:
        tasks = TaskManager(events)

        async def slow(progress: Progress) -> None:
            try:
                await asyncio.sleep(60)
            finally:
                cleaned.append("slow")

        running = tasks.submit("vm.clone", "vm/a", None, slow)
        await asyncio.sleep(0)
        queued = tasks.submit("vm.clone", "vm/b", None, slow)  # never gets to start
        await tasks.close()
        return running, queued

    running, queued = run(main())
    assert cleaned == ["slow"]
    for t in (running, queued):
        assert t.state == TaskState.ERROR and t.finished
        assert t.error == {"error": "cancelled", "message": "task cancelled"}
    assert [e.kind for e in events.list(kind_prefix="task.")] == [
        "task.started", "task.finished", "task.finished",
    ]  # fmt: skip


def test_submit_after_close_is_refused() -> None:
    async def main() -> None:
        tasks = TaskManager()
        await tasks.close()
        with pytest.raises(Exception, match="shutting down"):
            tasks.submit("vm.clone", "vm/a", None, lambda p: _value(1))

    run(main())


def test_events_for_tasks(events: EventLog) -> None:
    async def main() -> tuple[Task, Task]:
        tasks = TaskManager(events)
        ok = tasks.submit("vm.clone", "vm/demo", "alice", lambda p: _value(1))
        await tasks.wait(ok.id, timeout=5)

        async def bad(progress: Progress) -> None:
            raise NotFound("vm 'gone' does not exist")

        failed = tasks.submit("vm.suspend", "vm/gone", "bob", bad)
        await tasks.wait(failed.id, timeout=5)
        return ok, failed

    ok, failed = run(main())
    got = [(e.kind, e.object, e.user, e.message) for e in events.list()]
    assert got == [
        ("task.started", f"task/{ok.id}", "alice", "vm.clone vm/demo started"),
        ("task.finished", f"task/{ok.id}", "alice", "vm.clone vm/demo succeeded"),
        ("task.started", f"task/{failed.id}", "bob", "vm.suspend vm/gone started"),
        (
            "task.finished", f"task/{failed.id}", "bob",
            "vm.suspend vm/gone failed: vm 'gone' does not exist",
        ),
    ]  # fmt: skip
    finished = events.list()[-1].data
    assert finished == {
        "task": failed.id,
        "kind": "vm.suspend",
        "object": "vm/gone",
        "state": "error",
        "error": {"error": "not_found", "message": "vm 'gone' does not exist"},
    }
