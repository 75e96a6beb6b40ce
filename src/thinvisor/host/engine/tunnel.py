"""Live migration's channels between two host agents: TLS on the migration port.

QEMU never talks to the network itself: on each side it reads or writes a local socket
(a socket pair passed over QMP, or a unix socket in its run directory), and the agents
carry the bytes between the hosts over TLS. The source pins the destination's
certificate by its SHA-256 fingerprint before it sends anything, and every channel
opens with the one-time token of the migration it belongs to::

    source agent                                   destination agent (migration port)
    TLS handshake, fingerprint checked  --------->
    {"token": "...", "channel": "control"}\\n  --->  looked up: the migration it belongs to
                                        <---------  {"ok": true}\\n
    then JSON lines (control) or raw bytes (``memory``, ``disk:<name>``)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinvisor.errors import BackendError, InvalidArgument
from thinvisor.network import namespace
from thinvisor.tls import fingerprint_der

CHUNK = 256 << 10
HELLO_LIMIT = 4096
CONNECT_TIMEOUT_S = 15.0

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class TunnelError(BackendError):
    """A migration channel could not be opened, or broke."""


@dataclass
class Counter:
    """Bytes carried, for the task's report."""

    bytes: int = 0
    by_channel: dict[str, int] = field(default_factory=dict)

    def add(self, channel: str, n: int) -> None:
        self.bytes += n
        self.by_channel[channel] = self.by_channel.get(channel, 0) + n


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


def client_context() -> ssl.SSLContext:
    """No CA to check a self-signed certificate against: the fingerprint is checked
    right after the handshake instead (``open_channel``), before anything is sent."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def open_channel(
    address: str, port: int, fingerprint: str, token: str, channel: str
) -> Stream:
    """A channel of the migration ``token`` to the destination at ``address:port``."""
    where = f"{address}:{port}"
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(address, port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        sock = namespace.outside_socket(family)
        sock.setblocking(False)
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await asyncio.get_running_loop().sock_connect(sock, sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=client_context(), server_hostname=address
            )
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        raise TunnelError(f"cannot open a migration channel to {where}: {exc}") from exc
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    seen = fingerprint_der(der) if der else None
    if seen is None or seen != fingerprint.upper():
        writer.close()
        raise TunnelError(
            f"{where}: the certificate is not the destination's (fingerprint {seen},"
            f" expected {fingerprint.upper()})"
        )
    writer.write(json.dumps({"token": token, "channel": channel}).encode() + b"\n")
    reply = await read_message((reader, writer), timeout=CONNECT_TIMEOUT_S)
    if not reply.get("ok"):
        writer.close()
        raise TunnelError(f"{where} refused the {channel} channel: {reply.get('error')}")
    return reader, writer


async def read_message(stream: Stream, timeout: float | None = None) -> dict[str, Any]:
    """One JSON line; ``TunnelError`` when the channel ends or carries something else."""
    try:
        async with asyncio.timeout(timeout):
            line = await stream[0].readline()
    except (OSError, ssl.SSLError, ValueError, TimeoutError) as exc:
        raise TunnelError(f"migration channel: {exc or type(exc).__name__}") from exc
    if not line.endswith(b"\n"):
        raise TunnelError("migration channel: closed by the other side")
    try:
        message = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TunnelError(f"migration channel: not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise TunnelError("migration channel: not a JSON object")
    return message


async def send_message(stream: Stream, message: dict[str, Any]) -> None:
    try:
        stream[1].write(json.dumps(message).encode() + b"\n")
        await stream[1].drain()
    except (OSError, ssl.SSLError) as exc:
        raise TunnelError(f"migration channel: {exc}") from exc


async def read_hello(stream: Stream) -> tuple[str, str]:
    """The token and channel a new connection names (the destination's side)."""
    message = await read_message(stream, timeout=CONNECT_TIMEOUT_S)
    token, channel = message.get("token"), message.get("channel")
    if not isinstance(token, str) or not isinstance(channel, str):
        raise InvalidArgument("hello", "a channel must name its token and channel")
    return token, channel


async def pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    counter: Counter | None = None,
    channel: str = "",
) -> None:
    """Copy ``reader`` into ``writer`` until the end; the writer's side is then shut
    (plain sockets) or closed (TLS has no half-close)."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            if counter is not None:
                counter.add(channel, len(data))
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()
    except (OSError, ssl.SSLError):
        writer.close()


async def splice(a: Stream, b: Stream, counter: Counter | None, channel: str) -> None:
    """Carry bytes both ways between two streams until both directions have ended (or
    one breaks); both are closed after."""
    try:
        await asyncio.gather(pump(a[0], b[1], counter, channel), pump(b[0], a[1], None, channel))
    finally:
        for _, writer in (a, b):
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
