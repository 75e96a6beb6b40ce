"""The event log: JSON lines on disk, ids across restarts, rotation, live subscribers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thinvisor.errors import InvalidArgument
from thinvisor.host.events import Event, EventLog, SubscriptionDropped, iso_time


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "events.jsonl"


@pytest.fixture
def log(path: Path) -> Iterator[EventLog]:
    with EventLog(path, clock=lambda: 1_795_832_400.123) as log:
        yield log


def ids(events: list[Event]) -> list[int]:
    return [e.id for e in events]


def test_emit_appends_a_json_line_per_event(log: EventLog, path: Path) -> None:
    event = log.emit(
        "vm.powered_on", "vm demo powered on", object="vm/demo", user="alice", data={"a": 1}
    )
    assert event == Event(
        1, "2026-11-28T02:20:00.123Z", "vm.powered_on", "vm/demo", "alice",
        "vm demo powered on", {"a": 1},
    )  # fmt: skip
    [line] = path.read_text().splitlines()
    assert json.loads(line) == event.to_dict()
    assert path.stat().st_mode & 0o777 == 0o600


def test_iso_time_has_milliseconds_and_z() -> None:
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"
    assert iso_time(1.5) == "1970-01-01T00:00:01.500Z"


def test_event_data_is_copied_and_made_json(log: EventLog) -> None:
    data: dict[str, Any] = {"path": Path("/x"), "n": [1]}
    event = log.emit("disk.added", "added", data=data)
    data["n"].append(2)
    assert event.data == {"path": "/x", "n": [1]}
    assert log.list() == [event]


def test_ids_continue_across_reopen(path: Path) -> None:
    with EventLog(path) as log:
        for i in range(3):
            log.emit("agent.started", f"start {i}")
    with EventLog(path) as log:
        assert log.last_id == 3
        assert log.emit("agent.started", "again").id == 4
        assert ids(log.list()) == [1, 2, 3, 4]


def test_truncated_last_line_is_skipped(path: Path) -> None:
    with EventLog(path) as log:
        log.emit("vm.created", "one")
        log.emit("vm.created", "two")
    # A crash in the middle of writing the third event.
    with path.open("ab") as f:
        f.write(b'{"id":3,"time":"2026-11-28T02:1')
    with EventLog(path) as log:
        assert ids(log.list()) == [1, 2]
        assert log.emit("vm.created", "three").id == 3
    with EventLog(path) as log:
        assert [e.message for e in log.list()] == ["one", "two", "three"]


def test_corrupt_lines_in_the_middle_are_skipped(path: Path) -> None:
    with EventLog(path) as log:
        log.emit("vm.created", "one")
    with path.open("ab") as f:
        f.write(b"\x00\x00\x00\nnot json\n[1, 2]\n{}\n")
    with EventLog(path) as log:
        assert log.emit("vm.created", "two").id == 2
        assert ids(log.list()) == [1, 2]


def test_missing_file_is_an_empty_log(path: Path) -> None:
    with EventLog(path) as log:
        assert log.list() == []
        assert log.last_id == 0


def test_rotation_keeps_the_newest_half_under_the_bound(path: Path) -> None:
    max_bytes = 4096
    with EventLog(path, max_bytes=max_bytes) as log:
        for i in range(500):
            log.emit("vm.reconfigured", f"change {i}", object="vm/demo", data={"i": i})
            assert path.stat().st_size <= max_bytes
        kept = log.list(limit=1000)
        assert kept[-1].id == 500
        assert ids(kept) == list(range(kept[0].id, 501))
        assert sum(len(json.dumps(e.to_dict())) for e in kept) > max_bytes // 4
        assert not list(path.parent.glob(".*.tmp"))
    with EventLog(path, max_bytes=max_bytes) as log:
        assert log.emit("vm.deleted", "gone").id == 501


def test_rotation_keeps_an_event_bigger_than_half(path: Path) -> None:
    with EventLog(path, max_bytes=1000) as log:
        log.emit("vm.created", "small")
        log.emit("vm.created", "big", data={"blob": "x" * 2000})
        assert [e.message for e in log.list()] == ["big"]
    with EventLog(path, max_bytes=1000) as log:
        assert log.last_id == 2


def test_write_failure_is_logged_not_raised(
    log: EventLog, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A read-only handle stands in for a full disk: every write raises an OSError.
    assert log._file is not None
    log._file.close()
    log._file = open(path, "rb", buffering=0)  # noqa: SIM115
    event = log.emit("vm.created", "lost")
    assert event.id == 1
    assert "cannot write" in caplog.text
    assert log.emit("vm.created", "lost too").id == 2
    assert caplog.text.count("cannot write") == 1  # logged once, not per event
    log._file.close()
    log._file = log._open()  # the disk has room again
    log.emit("vm.created", "kept")
    assert [e.message for e in log.list()] == ["kept"]
    log._file.close()
    log._file = None
    assert log.emit("vm.created", "after close").id == 4


def test_filters(log: EventLog) -> None:
    log.emit("vm.powered_on", "on", object="vm/a")
    log.emit("vm.powered_on", "on", object="vm/b")
    log.emit("auth.login_failed", "bad password", object="user/alice", user="alice")
    log.emit("vm.powered_off", "off", object="vm/a")
    log.emit("task.started", "started", object="task/1")
    assert ids(log.list(object="vm/a")) == [1, 4]
    assert ids(log.list(kind_prefix="vm.")) == [1, 2, 4]
    assert ids(log.list(kind_prefix="auth.login")) == [3]
    assert ids(log.list(kind_prefix="vm.", object="vm/b")) == [2]
    assert ids(log.list(object="vm/none")) == []


def test_since_and_limit(log: EventLog) -> None:
    for i in range(10):
        log.emit("vm.created", f"e{i}")
    assert ids(log.list(limit=3)) == [8, 9, 10]
    assert ids(log.list(since=4, limit=3)) == [5, 6, 7]
    assert ids(log.list(since=7)) == [8, 9, 10]
    assert log.list(since=10) == []
    with pytest.raises(InvalidArgument):
        log.list(limit=0)


def test_list_reads_across_chunk_boundaries(log: EventLog) -> None:
    for i in range(300):
        log.emit("vm.created", f"e{i}", data={"pad": "p" * 500})
    events = log.list(limit=300)
    assert ids(events) == list(range(1, 301))
    assert events[123].message == "e123"


def test_subscribers_get_events_in_order(log: EventLog) -> None:
    async def main() -> None:
        async with log.subscribe() as a, log.subscribe() as b:
            assert log.subscribers == 2
            for i in range(5):
                log.emit("vm.created", f"e{i}")
            got_a = [await anext(a) for _ in range(5)]
            got_b = [await anext(b) for _ in range(5)]
            assert ids(got_a) == ids(got_b) == [1, 2, 3, 4, 5]
        assert log.subscribers == 0

    run(main())


def test_subscriber_wakes_for_events_emitted_later(log: EventLog) -> None:
    async def consume(sub: Any) -> list[str]:
        return [e.message async for e in sub]

    async def main() -> None:
        sub = log.subscribe()
        consumer = asyncio.create_task(consume(sub))
        for i in range(3):
            await asyncio.sleep(0)
            log.emit("vm.created", f"e{i}")
        await asyncio.sleep(0)
        sub.close()
        assert await consumer == ["e0", "e1", "e2"]

    run(main())


def test_slow_subscriber_is_dropped_without_blocking(log: EventLog) -> None:
    async def main() -> None:
        slow = log.subscribe(max_queue=3)
        async with log.subscribe(max_queue=100) as fast:
            for i in range(10):
                log.emit("vm.created", f"e{i}")  # never blocks
            assert log.subscribers == 1
            assert slow.dropped
            # What was queued is still delivered, then the drop is reported.
            assert [(await anext(slow)).id for _ in range(3)] == [1, 2, 3]
            with pytest.raises(SubscriptionDropped) as info:
                await anext(slow)
            assert info.value.last_id == 3
            assert ids([await anext(fast) for _ in range(10)]) == list(range(1, 11))
        slow.close()

    run(main())


def test_closing_the_log_ends_subscriptions(path: Path) -> None:
    async def main() -> None:
        log = EventLog(path)
        sub = log.subscribe()
        waiting = asyncio.create_task(anext(sub, None))
        await asyncio.sleep(0)
        log.close()
        assert await waiting is None
        assert log.subscribers == 0

    run(main())
