#!/usr/bin/env python3
"""A small IM-server integration for chatguard, in Python (asyncio + websockets).

What an IM server does with chatguard, in ~300 lines:

- keeps ONE WebSocket open (``Authorization: Bearer <token>``) and pipelines requests on it:
  replies are matched to requests by ``id`` and may come back out of order;
- before delivering a chat message, asks for a verdict: ``block`` -> rejected, ``review`` ->
  delivered masked and queued for a human, ``allow`` -> delivered, with matched spans masked
  using the verdict's offsets (char offsets index a Python ``str``; byte offsets index its UTF-8
  encoding -- both are used and cross-checked here);
- obeys pushed ``sanction`` events: a local table of sanctioned users (until their ``until``),
  messages from muted/blocked users are dropped without asking chatguard, throttled users may
  post once per ``--throttle-secs``;
- logs pushed ``room_alarm`` events (a room where many messages are being flagged).

Usage (server on 127.0.0.1:8686, e.g. ``make run`` or ``chatguard serve``)::

    python3 -m venv /tmp/exvenv && /tmp/exvenv/bin/pip install -r examples/requirements.txt
    /tmp/exvenv/bin/python examples/im_server.py --demo            # scripted run with checks
    printf 'alice: hello\\nbob: go fuck yourself\\n' | /tmp/exvenv/bin/python examples/im_server.py

Env: ``CHATGUARD_URL`` (default ``ws://127.0.0.1:8686/v1/ws``), ``CHATGUARD_TOKEN``.
``--demo`` exits 1 when chatguard did not behave as the script expects.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

log = logging.getLogger("im_server")


def now_ms() -> int:
    return int(time.time() * 1000)


class ChatGuard:
    """One pipelined connection to chatguard: request/reply by id, pushed events to a callback."""

    def __init__(self, ws: ClientConnection, on_event) -> None:
        self.ws = ws
        self.on_event = on_event
        self.pending: dict[str, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, token: str | None, on_event) -> "ChatGuard":
        headers = {"Authorization": f"Bearer {token}"} if token else None
        # proxy=None: talk to the sidecar directly even when *_PROXY is set.
        ws = await connect(url, additional_headers=headers, proxy=None, compression=None,
                           max_size=16 << 20)
        return cls(ws, on_event)

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                msg = json.loads(frame)
                fut = self.pending.pop(msg.get("id"), None) if "id" in msg else None
                if fut is not None and not fut.done():
                    fut.set_result(msg)  # a reply: verdict, pong, error, sanction, lookup_result
                elif msg.get("type") in ("sanction", "room_alarm"):
                    self.on_event(msg)  # pushed to every connection of the tenant
                else:
                    log.warning("unexpected frame: %s", msg)
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("chatguard connection closed"))

    async def request(self, kind: str, **fields) -> dict:
        rid = f"{kind[0]}-{next(self.ids)}"
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        await self.ws.send(json.dumps({"type": kind, "id": rid, **fields}))
        return await asyncio.wait_for(fut, timeout=30)

    async def close(self) -> None:
        await self.ws.close()
        await self.reader


def mask(text: str, matches: list[dict]) -> str:
    """Replaces every matched span with '*' (one per character), using char offsets, after
    checking that the byte offsets point at the same span of the UTF-8 encoding."""
    raw = text.encode("utf-8")
    chars = list(text)
    for m in matches:
        by_bytes = raw[m["start"]:m["end"]].decode("utf-8")
        by_chars = text[m["start_char"]:m["end_char"]]
        if by_bytes != by_chars:
            raise ValueError(f"offsets disagree for {m}: {by_bytes!r} vs {by_chars!r}")
        for i in range(m["start_char"], m["end_char"]):
            if not chars[i].isspace():
                chars[i] = "*"
    return "".join(chars)


@dataclass
class Sanction:
    action: str  # throttle | mute | block
    until_ms: int
    reason: str


@dataclass
class ImServer:
    """The IM server's side: local sanction table, delivery decisions, a review queue."""

    throttle_secs: float
    guard: ChatGuard | None = None
    sanctions: dict[str, Sanction] = field(default_factory=dict)
    last_post: dict[str, float] = field(default_factory=dict)
    review_queue: list[tuple[str, str]] = field(default_factory=list)
    alarms: list[dict] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def on_event(self, event: dict) -> None:
        if event["type"] == "sanction":
            user, action = event["user"], event["action"]
            if action == "ok":
                self.sanctions.pop(user, None)
                log.info("sanction lifted: %s (%s)", user, event["reason"])
            else:
                self.sanctions[user] = Sanction(action, event["until"], event["reason"])
                secs = max(0, event["until"] - now_ms()) / 1000
                log.info("SANCTION %s: %s for %.0fs (%s)", user, action, secs, event["reason"])
        elif event["type"] == "room_alarm":
            self.alarms.append(event)
            log.warning("ROOM ALARM %s: %d flagged messages in %ds (threshold %d)",
                        event["room"], event["flagged"], event["window_secs"], event["threshold"])

    def local_gate(self, user: str) -> str | None:
        """Why the message is refused before asking chatguard, or None."""
        s = self.sanctions.get(user)
        if s is None:
            return None
        if now_ms() >= s.until_ms:
            del self.sanctions[user]
            return None
        if s.action in ("mute", "block"):
            return f"{user} is {s.action}d ({s.reason})"
        if s.action == "throttle":
            last = self.last_post.get(user, 0.0)
            if time.monotonic() - last < self.throttle_secs:
                return f"{user} is throttled: one message per {self.throttle_secs:g}s"
        return None

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    async def post(self, user: str, room: str, text: str) -> str:
        """Handles one chat message; returns what happened to it."""
        why = self.local_gate(user)
        if why:
            self.count("dropped")
            log.info("[%s] %s: DROPPED locally: %s", room, user, why)
            return "dropped"
        self.last_post[user] = time.monotonic()
        v = await self.guard.request("moderate", user=user, room=room, text=text)
        if v["type"] == "error":
            self.count("error")
            log.error("[%s] %s: chatguard error %s: %s", room, user, v["code"], v["message"])
            return "error"
        # The verdict also says how chatguard sees the sender now (events may lag behind it).
        sender = v["sender"]
        if sender["state"] != "ok" and "until" in sender:
            self.sanctions.setdefault(user, Sanction(sender["state"], sender["until"], "verdict"))
        action = v["action"]
        self.count(action)
        if action == "block":
            log.info("[%s] %s: BLOCKED (%s %.2f)", room, user, v.get("label"), v["score"])
        else:
            shown = mask(text, v["matches"])
            if action == "review":
                self.review_queue.append((user, text))
            log.info("[%s] %s: %s%s", room, user, shown,
                     "   (queued for review)" if action == "review" else "")
        return action


async def demo(im: ImServer) -> list[str]:
    """A scripted conversation; returns the failed expectations."""
    failed = []

    def expect(ok: bool, what: str) -> None:
        log.info("check: %s: %s", what, "ok" if ok else "FAILED")
        if not ok:
            failed.append(what)

    pong = await im.guard.request("ping")
    expect(pong["type"] == "pong", "ping answered")

    # Pipelined: all sent before any verdict comes back.
    results = await asyncio.gather(
        im.post("alice", "lobby", "hi all, lunch at noon?"),
        im.post("bob", "lobby", "sure, see you there"),
        im.post("carol", "lobby", "you f.u.c.k.i.n.g idiot, ça va? 😀"),
        im.post("dave", "lobby", "I will kill you"),
    )
    expect(results[:2] == ["allow", "allow"], "clean messages allowed")
    expect(results[3] == "block", "threat blocked")

    # Masking with non-ASCII text before the match: char and byte offsets differ.
    v = await im.guard.request("moderate", user="erin", room="lobby",
                               text="héllo 😀 you idiot")
    masked = mask("héllo 😀 you idiot", v["matches"])
    expect(masked == "héllo 😀 you *****", f"masked {masked!r}")

    # A troll keeps going: chatguard escalates and pushes sanctions; once muted, the troll's
    # messages are dropped here without a round trip.
    for i in range(8):
        await im.post("troll", "lobby", f"shut up you worthless retard {i}")
    expect("troll" in im.sanctions, "troll sanctioned by a pushed event")
    expect(await im.post("troll", "lobby", "hello?") == "dropped", "sanctioned troll dropped")

    # A moderator mutes a user by hand; the event comes to every connection (this one too).
    reply = await im.guard.request("sanction", user="spammer", action="mute",
                                   duration_secs=60, reason="moderator")
    expect(reply["type"] == "sanction" and reply["action"] == "mute", "manual mute applied")
    await asyncio.sleep(0.2)  # the pushed event may come just after the reply
    expect(im.sanctions.get("spammer", Sanction("", 0, "")).action == "mute", "mute event seen")
    expect(await im.post("spammer", "lobby", "buy cheap followers") == "dropped",
           "muted user dropped")

    # Throttle by hand: one message per throttle_secs gets through.
    await im.guard.request("sanction", user="fast", action="throttle", duration_secs=60)
    await asyncio.sleep(0.2)
    first = await im.post("fast", "lobby", "one")
    second = await im.post("fast", "lobby", "two")
    expect(first == "allow" and second == "dropped", "throttled user limited")
    await im.guard.request("sanction", user="fast", action="ok")
    await asyncio.sleep(0.2)
    expect("fast" not in im.sanctions, "lifted sanction removed")

    # A raid: many users flag messages in one room -> room_alarm.
    await asyncio.gather(*(im.post(f"raider{i}", "live-42", f"kill yourself loser {i}")
                           for i in range(24)))
    await asyncio.sleep(0.2)
    expect(any(a["room"] == "live-42" for a in im.alarms), "room alarm for live-42")
    return failed


async def from_stdin(im: ImServer) -> None:
    """`user: text` per line; messages are pipelined (at most 64 in flight)."""
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task] = set()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        user, _, text = line.rstrip("\n").partition(":")
        if not text:
            user, text = "anonymous", user
        if text.strip():
            if len(in_flight) >= 64:
                _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            in_flight.add(asyncio.create_task(im.post(user.strip(), "lobby", text.strip())))
    if in_flight:
        await asyncio.wait(in_flight)


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=os.environ.get("CHATGUARD_URL", "ws://127.0.0.1:8686/v1/ws"))
    p.add_argument("--token", default=os.environ.get("CHATGUARD_TOKEN"))
    p.add_argument("--demo", action="store_true", help="run the scripted conversation")
    p.add_argument("--throttle-secs", type=float, default=2.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    im = ImServer(throttle_secs=args.throttle_secs)
    try:
        im.guard = await ChatGuard.connect(args.url, args.token, im.on_event)
    except (OSError, InvalidStatus) as e:  # refused, or HTTP 401 for a bad token
        log.error("cannot connect to %s: %s", args.url, e)
        return 2
    try:
        failed = await demo(im) if args.demo else (await from_stdin(im)) or []
    finally:
        await im.guard.close()
    log.info("done: %s; %d queued for review; sanctioned now: %s", im.stats,
             len(im.review_queue), {u: s.action for u, s in im.sanctions.items()})
    if failed:
        log.error("%d expectation(s) failed: %s", len(failed), failed)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
