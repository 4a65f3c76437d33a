"""pycrdt (Python, yrs) and the stock npm y-websocket WebsocketProvider (Node, yjs) edit one
document through the real collab server and converge; a late Python joiner gets everything.

The Python client is pycrdt's own `Provider` over an httpx-ws or a websockets connection
(collab_client.py; every test runs with both); the Node peer is node_peer.mjs. Y.Text "t" and
Y.Map "m" on both sides.
"""

from __future__ import annotations

import random

import anyio
import pytest
from pycrdt import Doc, Map, Text

from collab_client import synced_doc
from harness import WAIT_S, CollabServer, NodePeer, wait_until

pytestmark = pytest.mark.anyio


class PyClient:
    def __init__(self, name: str) -> None:
        self.name = name
        self.doc = Doc()
        self.text = self.doc.get("t", type=Text)
        self.map = self.doc.get("m", type=Map)

    def view(self) -> tuple[str, dict]:
        return str(self.text), self.map.to_py() or {}

    def describe(self) -> str:
        text, m = self.view()
        return f"{self.name}: text={text!r} map={m!r}"


async def node_view(peer: NodePeer) -> tuple[str, dict]:
    s = await peer.state()
    return s["text"], s["map"]


async def wait_synced(provider, who: str, server: CollabServer) -> None:
    with anyio.move_on_after(WAIT_S) as scope:
        await provider.synced.wait()
    if scope.cancelled_caught:
        raise AssertionError(f"{who} got no SyncStep2 within {WAIT_S} s\n{server.describe()}")


async def wait_node_synced(peer: NodePeer, server: CollabServer) -> None:
    async def synced() -> bool:
        return (await peer.state())["synced"]

    async def detail() -> str:
        return f"{peer.name}: {await peer.state()}{peer.stderr_note()}\n{server.describe()}"

    await wait_until(f"{peer.name} (WebsocketProvider) to reach synced", synced, detail)


async def wait_converged(py: PyClient, peer: NodePeer, server: CollabServer, what: str, check=None) -> tuple[str, dict]:
    """Wait until the Python and Node views are equal (and `check(text, map)` holds)."""

    async def converged() -> bool:
        v = await node_view(peer)
        return py.view() == v and (check is None or check(*v))

    async def detail() -> str:
        s = await peer.state()
        return (
            f"{py.describe()}\n{peer.name}: text={s['text']!r} map={s['map']!r} "
            f"synced={s['synced']} connected={s['connected']}{peer.stderr_note()}\n{server.describe()}"
        )

    await wait_until(what, converged, detail)
    return py.view()


async def test_python_and_node_converge_then_late_python_joiner(server, room, node_peers, transport):
    node = await node_peers("node", server.url, room)
    py = PyClient("python")
    async with synced_doc(server.url, room, py.doc, transport) as provider:
        await wait_synced(provider, "python", server)
        await wait_node_synced(node, server)

        # 1. each side's edits reach the other
        py.text += "0123456789"
        py.map["from_py"] = {"n": 1, "list": [1, "two", None, True], "s": "é✓"}
        py.map["gone"] = "delete me"
        await wait_converged(py, node, server, "python's first edits to reach node",
                             lambda t, m: t == "0123456789" and "gone" in m)
        await node.edits({"op": "set", "key": "from_js", "value": {"f": 2.5, "ok": False}})
        await wait_converged(py, node, server, "node's first edit to reach python",
                             lambda t, m: "from_js" in m)

        # 2. guaranteed-concurrent edits: node goes offline, both sides edit the same places,
        #    node reconnects and the two edit sets merge through collab
        await node.request("disconnect")
        with py.doc.transaction():
            del py.text[0:2]           # "23456789"
            py.text.insert(3, "py")    # "234py56789"
            py.map["both"] = "py"
            del py.map["gone"]
        await node.edits(
            {"op": "delete", "index": 8, "length": 2},   # "01234567"
            {"op": "insert", "index": 5, "text": "js"},  # "01234js567"
            {"op": "set", "key": "both", "value": "js"},
            {"op": "set", "key": "kept", "value": 7},
        )
        await node.request("connect")
        text, m = await wait_converged(py, node, server, "the concurrent offline edits to merge",
                                       lambda t, m: "kept" in m and "gone" not in m and len(t) == 10)
        assert text in ("234pyjs567", "234jspy567"), f"merged text {text!r}"
        assert m["both"] in ("py", "js")
        assert m == {
            "from_py": {"n": 1, "list": [1, "two", None, True], "s": "é✓"},
            "from_js": {"f": 2.5, "ok": False},
            "both": m["both"],
            "kept": 7,
        }, f"merged map {m!r}"

        # 3. live concurrent edits: both sides fire edits without waiting for the other's
        rng = random.Random(13)
        for i in range(30):
            # the text only grows here and holds 10 characters on both sides, so an index up
            # to 10 is valid on either side whatever the other's edits have reached it yet
            await node.edits(
                {"op": "insert", "index": rng.randint(0, 10), "text": f"<j{i}>"},
                {"op": "set", "key": f"k{i % 5}", "value": f"js{i}"},
            )
            py.text.insert(rng.randint(0, 10), f"<p{i}>")
            py.map[f"k{i % 5}"] = f"py{i}"
            if i % 10 == 9:
                await anyio.sleep(0.05)
        # inserts land inside each other's pieces, so compare the characters as a multiset:
        # nothing lost, nothing doubled
        pieces = "".join(f"<j{i}><p{i}>" for i in range(30))
        expected_chars = sorted(text + pieces)
        text, m = await wait_converged(
            py, node, server, "the live concurrent edits to converge",
            lambda t, m: sorted(t) == expected_chars,
        )
        for k in range(5):
            assert m[f"k{k}"] in {f"js{k + 25}", f"py{k + 25}"}, f"k{k} = {m[f'k{k}']!r}: not a last write"
        final = (text, m)

    # 4. a late Python joiner: everything above is on the server (both clients saw all of it),
    #    so the SyncStep2 that makes it "synced" must already carry all of it
    late = PyClient("late python")
    async with synced_doc(server.url, room, late.doc, transport) as provider:
        await wait_synced(provider, "the late python joiner", server)
        assert late.view() == final, (
            f"the late joiner's first sync is incomplete\n{late.describe()}\nexpected: {final!r}\n{server.describe()}"
        )
        # and it takes part live, both ways
        await node.edits({"op": "insert", "index": 0, "text": "[late-js]"})
        late.map["late_py"] = True
        await wait_converged(late, node, server, "live edits between node and the late joiner",
                             lambda t, m: t.startswith("[late-js]") and m.get("late_py") is True)


async def test_python_sees_what_node_wrote_before_it_joined(server, room, node_peers, transport):
    """Node writes first (text with a non-BMP character, nested map values), then Python joins
    with an edit of its own made offline."""
    node = await node_peers("node", server.url, room)
    await wait_node_synced(node, server)
    await node.edits(
        {"op": "insert", "index": 0, "text": "hello from yjs 👋"},
        {"op": "set", "key": "nested", "value": {"a": [1, 2, {"b": "c"}], "n": None}},
        {"op": "set", "key": "num", "value": 42},
    )
    # a second Node peer confirms the server holds the edit before Python joins
    witness = await node_peers("witness", server.url, room)
    await wait_node_synced(witness, server)

    async def witness_has_it() -> bool:
        return (await witness.state())["text"] == "hello from yjs 👋"

    async def detail() -> str:
        return f"witness: {await witness.state()}\n{server.describe()}"

    await wait_until("the witness peer to receive node's edit", witness_has_it, detail)

    py = PyClient("python")
    # written before connecting: it reaches the server in Python's answer to the server's
    # SyncStep1 (pycrdt's Provider only streams later transactions as Updates)
    py.map["offline_py"] = "written before connecting"
    async with synced_doc(server.url, room, py.doc, transport) as provider:
        await wait_synced(provider, "python", server)
        text, m = py.view()
        assert text == "hello from yjs 👋", f"{py.describe()}\n{server.describe()}"
        assert m == {
            "nested": {"a": [1, 2, {"b": "c"}], "n": None},
            "num": 42,
            "offline_py": "written before connecting",
        }, py.describe()
        await wait_converged(py, node, server, "python's offline edit to reach node",
                             lambda t, m: m.get("offline_py") == "written before connecting")
        # non-BMP characters: Yjs counts UTF-16 units, yrs must agree on the offsets
        py.text.insert(len(py.text), "!")
        await wait_converged(py, node, server, "python's append after an emoji to reach node",
                             lambda t, m: t == "hello from yjs 👋!")


async def test_late_python_joiner_gets_a_large_document(server, room, node_peers, transport):
    """A joiner receives the whole document, written as 1,100 separate updates, in one SyncStep2
    frame of about 1.1 MB: above the `websockets` library's default 1 MiB frame limit, which
    would end pycrdt's Provider silently (collab_client.py raises it to collab's 32 MiB)."""
    node = await node_peers("node", server.url, room)
    await wait_node_synced(node, server)
    chunk = "".join(chr(ord("a") + i % 26) for i in range(1000))
    n = 1100
    for i in range(n):
        await node.edits({"op": "insert", "index": i * 1000, "text": chunk})
    await node.edits({"op": "set", "key": "done", "value": True})
    expected = chunk * n

    # the server holds it all once a second Node peer has received it
    witness = await node_peers("witness", server.url, room)

    async def witness_has_it() -> bool:
        return (await witness.state(brief=True))["map"].get("done") is True

    async def detail() -> str:
        s = await witness.state(brief=True)
        return f"witness: synced={s['synced']} text length={s['textLength']} map={s['map']}\n{server.describe()}"

    await wait_until("the witness peer to receive the large document", witness_has_it, detail)
    assert (await witness.state())["text"] == expected, "the witness peer's text differs from what node wrote"

    py = PyClient("python")
    async with synced_doc(server.url, room, py.doc, transport) as provider:
        await wait_synced(provider, "python (joining a 1.1 MB document)", server)
        text, m = py.view()
        assert text == expected, f"python got {len(text)} characters, expected {len(expected)}"
        assert m == {"done": True}
