"""A pycrdt document synced with a collab (or any y-websocket) server.

pycrdt ships the y-websocket sync itself: ``pycrdt.Provider`` sends SyncStep1, answers the
server's SyncStep1 with SyncStep2, applies SyncStep2/Update messages and sends every local
transaction as an Update, one message per binary frame. It only needs a ``pycrdt.Channel``
(``path``, ``send(bytes)``, ``recv() -> bytes``, async iteration) over a WebSocket. Two are used
here, and the tests run with each:

- ``"httpx-ws"``: ``pycrdt.websocket.websocket.HttpxWebsocket`` from ``pycrdt-websocket`` over an
  ``httpx-ws`` connection, the client setup pycrdt-websocket documents;
- ``"websockets"``: ``WebsocketsChannel`` below, the same twenty lines over the ``websockets``
  library, for applications that already use it.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from httpx_ws import aconnect_ws
from pycrdt import Doc, Provider
from pycrdt.websocket.websocket import HttpxWebsocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

TRANSPORTS = ("httpx-ws", "websockets")

# Largest frame accepted from the server with `websockets` (its default is 1 MiB): collab's
# default --max-message-size, 32 MiB. A joining client gets the whole document in ONE SyncStep2
# frame, so the default would cut off every client of a document above 1 MiB (close 1009).
# httpx-ws has no such cap (its max_message_size_bytes is only the size of each socket read).
MAX_MESSAGE_SIZE = 32 * 1024 * 1024


class WebsocketsChannel:
    """A ``pycrdt.Channel`` over a ``websockets`` client connection."""

    def __init__(self, websocket: ClientConnection, path: str) -> None:
        self._websocket = websocket
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> "WebsocketsChannel":
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def send(self, message: bytes) -> None:
        await self._websocket.send(message)

    async def recv(self) -> bytes:
        message = await self._websocket.recv()
        if isinstance(message, str):
            raise ValueError(f"text frame from a y-websocket server: {message[:100]!r}")
        return message


@asynccontextmanager
async def synced_doc(url: str, room: str, doc: Doc, transport: str = "httpx-ws") -> AsyncIterator[Provider]:
    """Connect ``doc`` to ``url/room`` (``ws://host:port/room``) for the duration of the block.

    Yields the provider; ``await provider.synced.wait()`` returns once the server's SyncStep2
    (everything it holds) has been applied. On a normal exit, queued local updates are sent
    before the socket closes.
    """
    ws_url = f"{url.rstrip('/')}/{room}"
    if transport == "httpx-ws":
        async with aconnect_ws(ws_url) as websocket:
            async with Provider(doc, HttpxWebsocket(websocket, room)) as provider:
                yield provider
    elif transport == "websockets":
        async with connect(ws_url, max_size=MAX_MESSAGE_SIZE) as websocket:
            async with Provider(doc, WebsocketsChannel(websocket, room)) as provider:
                yield provider
    else:
        raise ValueError(f"unknown transport {transport!r}, expected one of {TRANSPORTS}")
