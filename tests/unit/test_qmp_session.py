"""Opening a QMP session when QEMU's events get in the way of the handshake."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from thinvisor.host.engine.qmp import Monitor

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}
EVENT = {"event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "running"}}
EVENT["timestamp"] = {"seconds": 0, "microseconds": 0}


async def _serve(sock: Path, sessions: list[int], *, stale: bool = False) -> asyncio.AbstractServer:
    """A QMP server whose first session goes wrong: an event before the greeting when
    ``stale`` (output left over from an earlier client), else after the handshake."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sessions.append(1)
        first = len(sessions) == 1
        if first and stale:
            writer.write(json.dumps(EVENT).encode() + b"\n")
        writer.write(json.dumps(GREETING).encode() + b"\n")
        try:
            async for request in _requests(reader):
                if request["execute"] == "qmp_capabilities" and first and not stale:
                    # The first session: an event overtakes the handshake's answer.
                    writer.write(json.dumps(EVENT).encode() + b"\n")
                status = {"status": "running", "running": True, "singlestep": False}
                answer: dict[str, object] = {"return": status}
                if "id" in request:
                    answer["id"] = request["id"]
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass  # the client hung up on the first session
        writer.close()

    return await asyncio.start_unix_server(session, path=str(sock))


async def _requests(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, object]]:
    """QMP requests as they come: JSON objects, not necessarily one per line."""
    decoder, buffer = json.JSONDecoder(), ""
    while chunk := await reader.read(4096):
        buffer += chunk.decode()
        while buffer.strip():
            try:
                request, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                break  # not whole yet
            buffer = buffer.lstrip()[end:]
            yield request


@pytest.mark.parametrize("stale", [False, True], ids=["after-handshake", "before-greeting"])
def test_a_handshake_overtaken_by_an_event_is_tried_again(tmp_path: Path, stale: bool) -> None:
    sock = tmp_path / "qmp.sock"
    sessions: list[int] = []

    async def go() -> str:
        server = await _serve(sock, sessions, stale=stale)
        async with server, Monitor("vm1", sock) as mon:
            return str(await mon.status())

    assert asyncio.run(go()) == "running"
    assert len(sessions) == 2
