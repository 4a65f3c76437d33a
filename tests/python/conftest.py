"""pytest fixtures of the Python client tests; the machinery is in harness.py (environment
variables documented there and in README.md)."""

from __future__ import annotations

import itertools
import os
import time

import pytest

from collab_client import TRANSPORTS
from harness import CollabServer, NodePeer


@pytest.fixture
def anyio_backend() -> str:
    # the anyio pytest plugin (anyio comes with pycrdt) runs the `@pytest.mark.anyio` tests
    return "asyncio"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """The WebSocket library under pycrdt's Provider (collab_client.py): every test runs with each."""
    return request.param


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The real collab binary on a free port with a fresh data directory."""
    srv = CollabServer(tmp_path_factory.mktemp("collab-data"))
    yield srv
    srv.stop()


_rooms = itertools.count(1)


@pytest.fixture
def room(request: pytest.FixtureRequest) -> str:
    """A document name no other test (or earlier run) uses."""
    return f"py-{request.node.name}-{os.getpid()}-{int(time.time() * 1000):x}-{next(_rooms)}"


@pytest.fixture
async def node_peers():
    """`await node_peers(name, url, room)` starts a NodePeer; all are closed after the test."""
    peers: list[NodePeer] = []

    async def start(name: str, url: str, room: str) -> NodePeer:
        peer = await NodePeer.start(name, url, room)
        peers.append(peer)
        return peer

    yield start
    for p in peers:
        await p.close()
