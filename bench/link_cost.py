"""What a front end's link costs the engine process, per client message (``serve --frontends``).

    python bench/link_cost.py [--rates 6400 25600 51200] [--sessions 1024] [--seconds 5] [--kind decode]

A spawned process plays a front end: it sends ``input`` messages (``--message-samples``: 20 ms of 24 kHz audio,
480 float32 samples, as a roundtrip client's message becomes after conversion; or 2048, one engine step, as the
connection side hands input over whole steps at a time; ``--kind decode``: one 24 kHz decoder step of codes,
a coarse frame's 7 codes) for ``--sessions`` sessions at each rate through the real
:class:`~snac_stream.server.frontends.Channel` in the real wire format (``pack_input``), coalescing as a front
end does. This process is the engine
process's side (:class:`~snac_stream.server.frontends.EngineHost`) with the engines replaced by a stand-in that
only takes the input: the figure is the link's own cost (reading, unpickling, routing each message to its
session), measured as this process's CPU time per message. 51200 messages a second is 1024 real-time roundtrip
sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import socket
import sys
import time
from pathlib import Path
from typing import Any, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_cost import commit, cpu_name, positive_int  # noqa: E402

from snac_stream.server.frontends import INPUT_COALESCE_S, Channel, EngineHost, pack_input  # noqa: E402

DECODE_STEP_CODES = 7  # a 24 kHz decoder step: one coarse frame, 1 + 2 + 4 codes
from snac_stream.server.session import Session  # noqa: E402


class _TakesInput:
    """The engines' stand-in: takes each message's input as Workers.deliver does (the session's inbox)."""

    def deliver(self, session: Session, item: Any, now: float) -> None:
        session.inbox.append((item, session.loop.received, now))
        if len(session.inbox) > 8:
            session.inbox.clear()

    def abort(self, session: Session) -> None:
        pass

    def release(self, session: Session) -> None:
        pass

    def start(self, sink: Any) -> None:
        pass

    def slots_free(self) -> list:
        return [0]

    def sessions_open(self) -> list:
        return [0]

    def health(self, stuck_after_s: float) -> Tuple[bool, str]:
        return True, "ok"


class _Options:
    stuck_tick_s = 10.0


def _front_end(sock: socket.socket, rate: float, seconds: float, sessions: int, samples: int, kind: str) -> None:
    async def main() -> None:
        channel = await Channel.connect(sock, lambda batch: None, lambda: None, coalesce_s=INPUT_COALESCE_S)
        item = np.arange(DECODE_STEP_CODES, dtype=np.int64) if kind == "decode" else np.zeros(samples, np.float32)
        t0, sent = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            due = int((time.perf_counter() - t0) * rate)
            while sent < due:  # what arrived from the clients since the last loop iteration; each message's
                # own array, as from a client (the same object twice in a batch would pickle as a reference)
                channel.send(("input", 1 + sent % sessions, *pack_input(item.copy()), sent, time.perf_counter()))
                sent += 1
            await asyncio.sleep(0.001)
        channel.close()
        await channel.wait_closed()
    asyncio.run(main())


async def _engine_side(sock: socket.socket, seconds: float, sessions: int) -> Tuple[int, float, float]:
    host = EngineHost(_TakesInput(), None, _Options())  # type: ignore[arg-type]
    front = await host.add(0, sock)
    for number in range(1, sessions + 1):
        front.sessions[number] = Session(None, number)  # type: ignore[arg-type]
    received = [0]
    handle = host._handle

    def counted(f: Any, message: Any) -> None:
        received[0] += 1
        handle(f, message)

    host._handle = counted  # type: ignore[method-assign]
    cpu0, t0 = time.process_time(), time.perf_counter()
    await front.channel.wait_closed()
    return received[0], time.process_time() - cpu0, time.perf_counter() - t0


def measure(rate: float, sessions: int, seconds: float, samples: int = 480, kind: str = "roundtrip") -> dict:
    ours, theirs = socket.socketpair()
    process = multiprocessing.get_context("spawn").Process(target=_front_end,
                                                           args=(theirs, rate, seconds, sessions, samples, kind))
    process.start()
    theirs.close()
    messages, cpu, wall = asyncio.run(_engine_side(ours, seconds, sessions))
    process.join()
    return {"rate": rate, "kind": kind, "message_samples": samples, "messages": messages, "cpu_s": cpu, "wall_s": wall,
            "cpu_per_wall_s": cpu / wall,
            "us_per_message": 1e6 * cpu / max(messages, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[6400, 25600, 51200])
    parser.add_argument("--sessions", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--message-samples", type=positive_int, default=480,
                        help="samples per input message: 480 (a 20 ms client message) or 2048 (a 24 kHz step, "
                             "what front ends hand over since input goes whole steps at a time)")
    parser.add_argument("--kind", default="roundtrip", choices=["roundtrip", "decode"],
                        help="decode: each message is a 24 kHz decoder step of codes rather than samples")
    args = parser.parse_args()
    logging.getLogger("snac_stream.server").setLevel(logging.CRITICAL)  # each run ends its front end on purpose
    print(f"# link cost on the engine side: {cpu_name()}, commit {commit()}, {args.sessions} sessions, "
          f"front end coalescing {1e3 * INPUT_COALESCE_S:g} ms, "
          + (f"{DECODE_STEP_CODES} codes a message" if args.kind == "decode" else
             f"{args.message_samples} samples a message"))
    print("| messages per second | received | engine-side CPU (s per s) | per message (us) |\n|---|---|---|---|")
    for rate in args.rates:
        row = measure(rate, args.sessions, args.seconds, args.message_samples, args.kind)
        print(f"| {rate:.0f} | {row['messages']} | {row['cpu_per_wall_s']:.3f} | {row['us_per_message']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
