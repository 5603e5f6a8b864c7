"""Serial panel link: encode/decode speed, send() cost on a stalled link, and round trips over a pty.

    python benchmarks/bench_panel.py [--frames 20000] [--pings 200]

Rows: encoding one Status / Counts frame (COBS + CRC32), decoding a mixed stream, ``PanelLink.send``
while the link is disconnected (the cost the video pipeline pays per call), frames/s through
pyserial's ``loop://``, and ping -> pong round-trip time with a PanelLink on a real pseudo-terminal
(the benchmark plays the panel on the master side). Encode rows are means per call; send and ping rows
medians with p99.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import time
import tty

from rich.console import Console
from rich.table import Table

from smearsight.device.panel.framing import Frame, FrameDecoder, encode_frame
from smearsight.device.panel.link import PanelLink, SerialLink
from smearsight.device.panel.protocol import Counts, Ping, Pong, RunState, Status

COUNTS = {
    "sertoli": 12,
    "primary_spermatocyte": 40,
    "round_spermatid": 77,
    "elongated_spermatid": 31,
    "immature_sperm": 9,
    "mature_sperm": 120,
}


def per_call_us(fn, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--pings", type=int, default=200)
    args = ap.parse_args()
    rows: list[tuple[str, str, str]] = []

    status = Status(RunState.RUNNING, 29.97, 1234, "S-0001", "all good")
    counts = Counts(COUNTS, "S-0001", 1234)
    rows.append(("encode Status frame", f"{per_call_us(lambda i: encode_frame(status, i), args.frames):.1f} µs", ""))
    size = len(encode_frame(counts, 0))
    rows.append(
        (
            "encode Counts frame (6 classes)",
            f"{per_call_us(lambda i: encode_frame(counts, i), args.frames):.1f} µs",
            f"{size} B",
        )
    )

    stream = b"".join(encode_frame(status if i % 2 else counts, i) for i in range(args.frames))
    dec = FrameDecoder()
    t0 = time.perf_counter()
    for i in range(0, len(stream), 4096):
        dec.feed(stream[i : i + 4096])
    dt = time.perf_counter() - t0
    assert dec.stats.frames == args.frames and dec.stats.errors == 0
    rows.append(("decode mixed stream", f"{args.frames / dt:,.0f} frames/s", f"{len(stream) / dt / 1e6:.1f} MB/s"))

    link = PanelLink("/nonexistent/smearsight-bench", queue_size=64, backoff_initial=10)
    link.start()
    samples = []
    for i in range(args.frames):
        t = time.perf_counter()
        link.send_status(RunState.RUNNING, 30.0, i)
        link.send_counts(COUNTS, "S", i)
        samples.append((time.perf_counter() - t) / 2)
    link.close()
    samples.sort()
    rows.append(
        (
            "PanelLink.send (status+counts, no port)",
            f"{statistics.median(samples) * 1e6:.1f} µs",
            f"p99 {samples[int(len(samples) * 0.99)] * 1e6:.1f} µs, max {samples[-1] * 1e6:.0f} µs",
        )
    )

    got = []
    loop = SerialLink("loop://", queue_size=args.frames, coalesce=())
    loop.on_any(got.append)
    n = min(args.frames, 5000)
    with loop:
        loop.wait_connected(2)
        t0 = time.perf_counter()
        for _ in range(n):
            loop.send(counts)
        while len(got) < n and time.perf_counter() - t0 < 30:
            time.sleep(0.001)
        dt = time.perf_counter() - t0
    rows.append(("loop:// send -> receive", f"{len(got) / dt:,.0f} frames/s", f"{len(got)}/{n} frames"))

    master, slave = os.openpty()
    tty.setraw(slave)
    link = PanelLink(os.ttyname(slave))
    dec = FrameDecoder()
    rtts = []
    with link:
        link.wait_connected(2)
        for i in range(args.pings):
            t = time.perf_counter()
            os.write(master, encode_frame(Ping(i), i))
            done = False
            while not done and time.perf_counter() - t < 2:
                if select.select([master], [], [], 0.5)[0]:
                    for ev in dec.feed(os.read(master, 4096)):
                        done = done or (isinstance(ev, Frame) and ev.message == Pong(i))
            rtts.append(time.perf_counter() - t)
    os.close(master)
    os.close(slave)
    rtts.sort()
    rows.append(
        (
            "ping -> pong over a pty",
            f"{statistics.median(rtts) * 1e3:.2f} ms",
            f"p99 {rtts[int(len(rtts) * 0.99)] * 1e3:.2f} ms (n={len(rtts)})",
        )
    )

    table = Table(title=f"serial panel link ({os.cpu_count()} CPUs)")
    for col in ("measure", "result", "notes"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
