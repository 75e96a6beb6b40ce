"""Opening a QMP session when QEMU's events get in the way of the handshake."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

from thinvisor.host.engine.qmp import Monitor

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}
EVENT = {"event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "running"}}
EVENT["timestamp"] = {"seconds": 0, "microseconds": 0}


async def _serve(sock: Path, sessions: list[int]) -> asyncio.AbstractServer:
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sessions.append(1)
        writer.write(json.dumps(GREETING).encode() + b"\n")
        first = len(sessions) == 1
        try:
            async for request in _requests(reader):
                if request["execute"] == "qmp_capabilities" and first:
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


def test_a_handshake_overtaken_by_an_event_is_tried_again(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    sessions: list[int] = []

    async def go() -> str:
        server = await _serve(sock, sessions)
        async with server, Monitor("vm1", sock) as mon:
            return str(await mon.status())

    assert asyncio.run(go()) == "running"
    assert len(sessions) == 2
