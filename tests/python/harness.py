"""Harness of the Python client tests: the real `collab` binary, stock npm y-websocket peers
(node_peer.mjs) and bounded waits. The pytest fixtures around them are in conftest.py.

Environment:
  COLLAB_BIN      server binary (default ../../target/debug/collab), started as
                  `collab --addr 127.0.0.1:0 --data-dir <fresh tmp dir>`; must print
                  `listening on HOST:PORT` on stdout
  COLLAB_WAIT_MS  bound of each wait (default 5000)
  INTEROP_DIR     folder whose node_modules hold yjs, y-websocket and ws (default ../interop,
                  after `npm ci` there)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

HERE = Path(__file__).resolve().parent
BIN = Path(os.environ.get("COLLAB_BIN") or HERE / "../../target/debug/collab").resolve()
INTEROP_DIR = Path(os.environ.get("INTEROP_DIR") or HERE / "../interop").resolve()
WAIT_S = float(os.environ.get("COLLAB_WAIT_MS", "5000")) / 1000
STARTUP_S = max(WAIT_S, 10.0)


# ---------------------------------------------------------------------------------------------
# the collab server
# ---------------------------------------------------------------------------------------------


class CollabServer:
    def __init__(self, data_dir: Path) -> None:
        if not BIN.is_file():
            pytest.fail(
                f"collab server binary not found at {BIN}: build it with "
                "`cargo build -p collab-server --bin collab` or set COLLAB_BIN",
                pytrace=False,
            )
        self.args = [str(BIN), "--addr", "127.0.0.1:0", "--data-dir", str(data_dir)]
        self.log: list[str] = []
        self.url: str | None = None
        self._listening = threading.Event()
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        threading.Thread(target=self._read_output, daemon=True).start()
        if not self._listening.wait(STARTUP_S) or self.url is None:
            self.stop()
            raise RuntimeError(
                f'collab did not print "listening on HOST:PORT" within {STARTUP_S} s\n{self.describe()}'
            )

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            m = re.match(r"listening on (\[[^\]]+\]|[^\s:]+):(\d+)\s*$", line)
            if m and self.url is None:
                self.url = f"ws://{m.group(1)}:{m.group(2)}"
                self._listening.set()
        self._listening.set()  # exited before listening: do not make the start wait its bound

    def describe(self) -> str:
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited with {rc}"
        tail = "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", l) for l in self.log[-25:])
        return f"[server {' '.join(self.args)}; {state}]\n--- server output (tail) ---\n{tail}\n---"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ---------------------------------------------------------------------------------------------
# stock npm WebsocketProvider peers (node_peer.mjs)
# ---------------------------------------------------------------------------------------------


class NodePeer:
    """One `node node_peer.mjs URL ROOM` process: a y-websocket WebsocketProvider on Y.Doc."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self._next_id = 0
        self._stderr: list[str] = []
        self._stderr_task = asyncio.ensure_future(self._drain_stderr())

    @classmethod
    async def start(cls, name: str, url: str, room: str) -> "NodePeer":
        node = shutil.which("node")
        if node is None:
            pytest.fail("`node` is not on PATH (the npm y-websocket peer needs Node 20+)", pytrace=False)
        if not (INTEROP_DIR / "node_modules" / "y-websocket").is_dir():
            pytest.fail(
                f"{INTEROP_DIR}/node_modules has no y-websocket: run `npm ci` in tests/interop "
                "(or set INTEROP_DIR)",
                pytrace=False,
            )
        proc = await asyncio.create_subprocess_exec(
            node,
            str(HERE / "node_peer.mjs"),
            url,
            room,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "INTEROP_DIR": str(INTEROP_DIR)},
            limit=64 * 1024 * 1024,  # a `state` line carries the whole text
        )
        peer = cls(name, proc)
        first = await peer._read_line("the node peer to start")
        if first.get("ready") is not True:
            raise AssertionError(f"{name}: unexpected first line {first!r}{peer.stderr_note()}")
        return peer

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self._stderr.append(line.decode(errors="replace").rstrip())

    def stderr_note(self) -> str:
        return f"\n--- {self.name} stderr ---\n" + "\n".join(self._stderr[-20:]) if self._stderr else ""

    async def _read_line(self, what: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), WAIT_S)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.name}: no answer within {WAIT_S} s waiting for {what}{self.stderr_note()}")
        if not line:
            await asyncio.sleep(0.1)  # let stderr drain
            raise AssertionError(f"{self.name}: node exited ({self.proc.returncode}) waiting for {what}{self.stderr_note()}")
        return json.loads(line)

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        self._next_id += 1
        msg = {"id": self._next_id, "op": op, **args}
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        await self.proc.stdin.drain()
        reply = await self._read_line(f"the answer to {msg}")
        if reply.get("id") != self._next_id or "error" in reply:
            raise AssertionError(f"{self.name}: {op} failed: {reply!r}{self.stderr_note()}")
        return reply

    async def state(self, brief: bool = False) -> dict[str, Any]:
        """synced, connected, textLength, text (left out when `brief`) and map."""
        return await self.request("state", brief=brief)

    async def edits(self, *edits: dict[str, Any]) -> None:
        """Apply the edits in one Yjs transaction (one update on the wire)."""
        await self.request("edits", edits=list(edits))

    async def close(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # node_peer.mjs destroys the provider and exits
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._stderr_task.cancel()


# ---------------------------------------------------------------------------------------------
# bounded waits
# ---------------------------------------------------------------------------------------------


async def wait_until(
    what: str,
    cond: Callable[[], Awaitable[bool]],
    detail: Callable[[], Awaitable[str]],
    timeout: float = WAIT_S,
) -> None:
    """Poll `cond` until it holds, at most `timeout` seconds; otherwise fail saying what we
    waited for and the state `detail` describes."""
    deadline = time.monotonic() + timeout
    while True:
        if await cond():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{await detail()}")
        await asyncio.sleep(0.02)
