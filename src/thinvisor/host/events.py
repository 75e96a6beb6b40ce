"""The host's event log: every state change, kept on disk as JSON lines.

Events are history, not state: each one is appended and flushed, never fsynced, and the
file is bounded. When it grows past ``max_bytes`` it is rewritten atomically keeping the
newest half. Ids are increasing integers that continue across restarts, so a client can
resume with ``list(since=last_id)`` after a reconnect, or after its subscription was
dropped for falling behind.

The log belongs to the agent's event loop: call ``emit`` from the loop's thread.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import dataclasses
import io
import json
import logging
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from thinvisor.errors import InvalidArgument, ThinvisorError
from thinvisor.fs import atomic_write, tail

logger = logging.getLogger(__name__)

_READ_CHUNK = 65536


def iso_time(t: float) -> str:
    """``t`` (seconds since the epoch) as ISO 8601 UTC with milliseconds."""
    stamp = datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


@dataclass(frozen=True)
class Event:
    """One state change: ``kind`` is dotted (``vm.powered_on``), ``object`` names what
    changed (``vm/demo``, ``user/alice``, ``task/<id>``), ``user`` who changed it."""

    id: int
    time: str
    kind: str
    object: str | None
    user: str | None
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_event(line: bytes) -> Event | None:
    """The event a stored line holds, or None when the line is corrupt."""
    try:
        d = json.loads(line)
        event = Event(
            id=d["id"],
            time=d["time"],
            kind=d["kind"],
            object=d["object"],
            user=d["user"],
            message=d["message"],
            data=d["data"],
        )
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(event.id, int) or not isinstance(event.data, dict):
        return None
    return event


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _lines_reversed(path: Path) -> Generator[bytes]:
    """The non-empty lines of a file, last first, read backwards in chunks."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        pos = f.seek(0, os.SEEK_END)
        rest = b""
        while pos > 0:
            step = min(_READ_CHUNK, pos)
            pos -= step
            f.seek(pos)
            lines = (f.read(step) + rest).split(b"\n")
            rest = lines[0]
            yield from (line for line in reversed(lines[1:]) if line)
        if rest:
            yield rest


def _events_reversed(path: Path) -> Generator[Event]:
    for line in _lines_reversed(path):
        event = parse_event(line)
        if event is not None:
            yield event


class SubscriptionDropped(ThinvisorError):
    """A subscriber fell too far behind and was dropped; ``last_id`` is the id of the
    last event it received (resume with ``EventLog.list(since=last_id)``)."""

    def __init__(self, max_queue: int, last_id: int | None) -> None:
        super().__init__(f"event subscriber fell more than {max_queue} events behind")
        self.last_id = last_id


class Subscription:
    """New events, in order, as an async iterator; ``async with`` closes it.

    Events emitted after ``EventLog.subscribe`` returned are queued for it, up to
    ``max_queue``. One more and the subscription is dropped: the events already queued
    are still yielded, then iteration raises ``SubscriptionDropped``. Closing it, or
    closing the log, ends iteration.
    """

    def __init__(self, log: EventLog, max_queue: int) -> None:
        self._log = log
        self.max_queue = max_queue
        self._queue: collections.deque[Event] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.dropped = False
        self.last_id: int | None = None

    def _deliver(self, event: Event) -> bool:
        """Queue ``event``; False when the subscriber is full and was dropped."""
        if len(self._queue) >= self.max_queue:
            self.dropped = True
            self._wake()
            return False
        self._queue.append(event)
        self._wake()
        return True

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """Unregister; iteration ends."""
        if not self.closed:
            self.closed = True
            self._queue.clear()
            self._log._unsubscribe(self)
            self._wake()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self.closed:
                raise StopAsyncIteration
            if self._queue:
                event = self._queue.popleft()
                self.last_id = event.id
                return event
            if self.dropped:
                raise SubscriptionDropped(self.max_queue, self.last_id)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EventLog:
    """The append-only, size-bounded JSON-lines event log, with live subscribers."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 4 << 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._clock = clock
        self._subscribers: builtins.list[Subscription] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: io.FileIO | None = self._open()
        self._size = os.fstat(self._file.fileno()).st_size
        # A crash mid-write leaves a line without its newline; start on a fresh line.
        self._torn = self._size > 0 and not tail(path, 1).endswith(b"\n")
        if self._torn:
            logger.warning("event log %s: its last line is incomplete; skipping it", path)
        self._last_id = next((e.id for e in _events_reversed(path)), 0)
        self._write_failed = False

    def _open(self) -> io.FileIO:
        # Unbuffered: each line goes to the kernel at once. Held open for the log's life.
        return open(self.path, "ab", buffering=0, opener=_private)

    @property
    def last_id(self) -> int:
        return self._last_id

    def emit(
        self,
        kind: str,
        message: str,
        *,
        object: str | None = None,
        user: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> Event:
        """Record an event and hand it to every subscriber.

        A failure to write is logged, not raised: the change the event reports has
        already happened, and losing its history must not undo or fail it.
        """
        self._last_id += 1
        record = {
            "id": self._last_id,
            "time": iso_time(self._clock()),
            "kind": kind,
            "object": object,
            "user": user,
            "message": message,
            "data": data or {},
        }
        line = json.dumps(record, default=str, separators=(",", ":")).encode() + b"\n"
        # Parsed back, so that subscribers get what ``list`` will return, unaliased.
        event = parse_event(line)
        assert event is not None
        self._store(line)
        self._publish(event)
        return event

    def _store(self, line: bytes) -> None:
        if self._file is None:
            logger.warning("event log is closed; event %s not recorded", line[:200])
            return
        try:
            self._append(line)
            if self._size > self.max_bytes:
                self._rotate()
        except OSError as exc:
            if not self._write_failed:
                logger.error("event log %s: cannot write: %s", self.path, exc)
            self._write_failed = True
            return
        self._write_failed = False

    def _append(self, line: bytes) -> None:
        assert self._file is not None
        data = memoryview(b"\n" + line if self._torn else line)
        self._torn = True  # until the whole line is written
        while data:
            n = self._file.write(data)
            assert n is not None
            self._size += n
            data = data[n:]
        self._torn = False

    def _rotate(self) -> None:
        """Rewrite the file keeping the newest half (at least the newest event)."""
        keep = self.max_bytes // 2
        data = tail(self.path, keep + 1)
        start = data.find(b"\n") + 1
        if start >= len(data):
            # One event bigger than the half: keep it alone, so that its id survives.
            with contextlib.closing(_lines_reversed(self.path)) as lines:
                data = next(lines, b"") + b"\n"
        else:
            data = data[start:]
        atomic_write(self.path, data, mode=0o600)
        assert self._file is not None
        self._file.close()
        self._file = self._open()
        self._size = len(data)
        logger.info("event log %s rotated: kept %d bytes", self.path, self._size)

    def _publish(self, event: Event) -> None:
        for sub in builtins.list(self._subscribers):
            if not sub._deliver(event):
                logger.warning(
                    "event subscriber dropped: more than %d events behind", sub.max_queue
                )
                self._unsubscribe(sub)

    def list(
        self,
        *,
        since: int | None = None,
        limit: int = 100,
        object: str | None = None,
        kind_prefix: str | None = None,
    ) -> builtins.list[Event]:
        """Stored events, oldest first, filtered.

        With ``since``: the first ``limit`` events with an id greater than ``since``
        (page forward by passing the last id returned). Without: the newest ``limit``.
        ``kind_prefix`` is a plain string prefix of the kind, e.g. ``"vm."``.
        """
        if limit < 1:
            raise InvalidArgument("limit", "must be at least 1")
        found: builtins.list[Event] = []
        with contextlib.closing(_events_reversed(self.path)) as events:
            for event in events:
                if since is not None and event.id <= since:
                    break
                if object is not None and event.object != object:
                    continue
                if kind_prefix is not None and not event.kind.startswith(kind_prefix):
                    continue
                found.append(event)
                if since is None and len(found) == limit:
                    break
        found.reverse()
        return found[:limit]

    def subscribe(self, max_queue: int = 1000) -> Subscription:
        """A live feed of the events emitted from now on (see ``Subscription``)."""
        if max_queue < 1:
            raise InvalidArgument("max_queue", "must be at least 1")
        sub = Subscription(self, max_queue)
        self._subscribers.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def close(self) -> None:
        """Close the file and end every subscription."""
        for sub in builtins.list(self._subscribers):
            sub.close()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
