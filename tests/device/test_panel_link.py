"""SerialLink / PanelLink over pyserial's ``loop://`` and real pseudo-terminals (os.openpty)."""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from pathlib import Path

import pytest

from smearsight.device.panel.framing import DecodeError, Frame, FrameDecoder, encode_frame
from smearsight.device.panel.link import LinkState, PanelLink, SerialLink
from smearsight.device.panel.protocol import (
    Alert,
    AlertLevel,
    Capture,
    Counts,
    Freeze,
    FreezeMode,
    MsgType,
    Ping,
    Pong,
    RunState,
    StartSession,
    Status,
    StopSession,
    Summary,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs pseudo-terminals")

EVERY_MESSAGE = [
    Status(RunState.RUNNING, 24.0, 10, "S1", "ok"),
    Counts({"sertoli": 2, "mature_sperm": 9}, "S1", 10),
    Summary("S1", 33.5, 800, 2, {"sertoli": 2}, ""),
    Alert(AlertLevel.WARNING, "focus drifting", 3),
    Pong(7),
    StartSession("slide 3"),
    StopSession(),
    Freeze(FreezeMode.OFF),
    Capture(),
    Ping(11),
]


def wait_for(pred, timeout: float = 5.0, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


class Pty:
    """A pseudo-terminal: the link opens ``name`` (the slave); the test plays the far end on the master."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.name = os.ttyname(self._slave)
        self.decoder = FrameDecoder()
        self.events: list[Frame | DecodeError] = []

    def write(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.master, data) :]

    def pump(self, timeout: float = 0.05) -> list[Frame | DecodeError]:
        new: list[Frame | DecodeError] = []
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            new = self.decoder.feed(os.read(self.master, 65536))
            self.events += new
        return new

    def messages(self) -> list:
        return [e.message for e in self.events if isinstance(e, Frame)]

    def read_until(self, pred, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            if pred(self.messages()):
                return True
        return False

    def unplug(self) -> None:
        for fd in (self.master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pty_port():
    p = Pty()
    yield p
    p.unplug()


def test_loop_url_round_trip_of_every_message_type() -> None:
    link = SerialLink("loop://")
    got: list[Frame] = []
    link.on_any(got.append)
    with link:
        assert link.wait_connected(2)
        for m in EVERY_MESSAGE:
            assert link.send(m)
        assert wait_for(lambda: len(got) == len(EVERY_MESSAGE))
        assert link.seconds_since_rx() < 5
        link.silence_warning = 0.0
        assert "silent" in link.status_line()
    assert [f.message for f in got] == EVERY_MESSAGE
    assert [f.seq for f in got] == list(range(len(EVERY_MESSAGE)))
    assert link.state is LinkState.CLOSED
    assert link.stats.sent == len(EVERY_MESSAGE) and link.stats.rx.errors == 0


def test_pty_runtime_to_panel_and_commands_back(pty_port: Pty) -> None:
    link = PanelLink(pty_port.name)
    commands: list[str] = []
    for code in (MsgType.START_SESSION, MsgType.STOP_SESSION, MsgType.FREEZE, MsgType.CAPTURE):
        link.on(code, lambda f: commands.append(f.type_name))
    with link:
        assert link.wait_connected(2)
        runtime_msgs = EVERY_MESSAGE[:4]
        link.send_status(RunState.RUNNING, 24.0, 10, "S1", "ok")
        link.send_counts({"sertoli": 2, "mature_sperm": 9}, "S1", 10)
        link.send_summary(EVERY_MESSAGE[2])
        link.send_alert("focus drifting", AlertLevel.WARNING, 3)
        assert pty_port.read_until(lambda ms: len(ms) >= 4)
        assert pty_port.messages() == runtime_msgs
        # panel -> runtime: commands reach their handlers, a ping is answered with the same nonce
        for i, m in enumerate([StartSession("A"), Freeze(FreezeMode.ON), Capture(), StopSession(), Ping(99)]):
            pty_port.write(encode_frame(m, i))
        assert pty_port.read_until(lambda ms: Pong(99) in ms)
        assert wait_for(lambda: len(commands) == 4)
    assert commands == ["START_SESSION", "FREEZE", "CAPTURE", "STOP_SESSION"]
    assert link.stats.rx.frames == 5 and link.stats.handler_errors == 0


def test_pty_corruption_garbage_and_truncation_do_not_stop_the_reader(pty_port: Pty) -> None:
    link = PanelLink(pty_port.name)
    pings: list[int] = []
    errors: list[DecodeError] = []
    link.on(MsgType.PING, lambda f: pings.append(f.message.nonce))
    link.on_error(errors.append)

    def boom(frame: Frame) -> None:
        raise RuntimeError("a buggy handler")

    link.on(MsgType.CAPTURE, boom)
    with link:
        assert link.wait_connected(2)
        corrupted = bytearray(encode_frame(Ping(2), 1))
        corrupted[-3] ^= 0x01  # inside the CRC
        truncated = encode_frame(StartSession("x" * 50), 2)[:-10]
        pty_port.write(
            encode_frame(Ping(1), 0)
            + b"+++ATH0\r\n"
            + bytes(corrupted)
            + truncated
            + encode_frame(Capture(), 3)
            + b"\xff" * 3000
            + encode_frame(Ping(3), 4)
        )
        assert wait_for(lambda: pings == [1, 3])
        assert wait_for(lambda: len(errors) == 4)
    rx = link.stats.rx
    # modem noise and the cut frame: garbage/truncated; 3000 bytes without a delimiter: oversized
    assert rx.crc_errors == 1 and rx.garbage + rx.truncated == 2 and rx.oversized == 1
    assert rx.garbage_bytes >= 3000 + 9
    assert link.stats.handler_errors == 1  # the buggy handler was counted; the reader went on
    assert link.state is LinkState.CLOSED


def test_send_never_blocks_on_a_stalled_port(pty_port: Pty) -> None:
    # Nobody reads the master: the pty buffer fills and writes stall until write_timeout.
    link = PanelLink(pty_port.name, queue_size=32, write_timeout=0.2)
    big = "x" * 240
    with link:
        assert link.wait_connected(2)

        def stalled() -> bool:
            for _ in range(32):
                link.send_alert(big)
            return link.stats.write_timeouts > 0

        assert wait_for(stalled, timeout=15)
        batches, slowest = [], 0.0
        for _ in range(3):  # best of three batches: CPU contention on a shared CI box is not blocking
            t0 = time.perf_counter()
            for i in range(1000):
                t = time.perf_counter()
                link.send_alert(f"{i} {big}")
                slowest = max(slowest, time.perf_counter() - t)
            batches.append(time.perf_counter() - t0)
        # not a benchmark, a generous bound: one send that waited for the wire would take >= 0.2 s
        assert min(batches) < 0.05, batches
        assert slowest < 0.1, slowest
        for i in range(200):
            link.send_status(RunState.RUNNING, 30.0, i)
        assert link.queue_length() <= 32
        assert link.stats.dropped >= 3000 - 32
        assert link.stats.coalesced >= 199  # only the newest waiting status is kept
        # the panel comes back to life and reads: the link resumes, the newest status arrives
        link.send_alert("the end", AlertLevel.INFO, 99)
        assert pty_port.read_until(lambda ms: Alert(AlertLevel.INFO, "the end", 99) in ms, timeout=10)
    assert Status(RunState.RUNNING, 30.0, 199) in pty_port.messages()
    assert not any(isinstance(m, Status) and m.frame < 199 for m in pty_port.messages())


def test_1000_enqueues_under_50ms_while_disconnected() -> None:
    link = PanelLink("/nonexistent/tty-smearsight", queue_size=64, backoff_initial=0.05)
    with link:
        elapsed = []
        for _ in range(3):  # best of three batches (see above)
            t0 = time.perf_counter()
            for i in range(1000):
                link.send_alert(f"alert {i}")
            elapsed.append(time.perf_counter() - t0)
        assert wait_for(lambda: link.stats.open_failures >= 1, timeout=2)
        assert link.queue_length() == 64 and link.stats.dropped == 3000 - 64
        assert link.state is LinkState.CONNECTING and "retrying" in link.status_line()
        assert "nonexistent" in link.last_error
    assert min(elapsed) < 0.05, elapsed


def test_unplugged_port_is_reopened_with_backoff_and_resumes(tmp_path: Path) -> None:
    first = Pty()
    port = tmp_path / "ttyPANEL"  # like a udev symlink (/dev/smearsight-panel) that follows the adapter
    port.symlink_to(first.name)
    states: list[LinkState] = []
    link = PanelLink(str(port), backoff_initial=0.05, backoff_max=0.4)
    link.on_state(lambda s, d: states.append(s))
    pings: list[int] = []
    link.on(MsgType.PING, lambda f: pings.append(f.message.nonce))
    second = None
    try:
        link.start()
        assert link.wait_connected(2)
        link.send_status(RunState.RUNNING, 30.0, 1)
        assert first.read_until(lambda ms: len(ms) >= 1)

        # unplug: the pty goes away and so does the device path
        first.unplug()
        port.unlink()
        assert wait_for(lambda: link.state is LinkState.RECONNECTING, timeout=3)
        assert wait_for(lambda: link.stats.open_failures >= 4, timeout=5)
        assert "retrying" in link.status_line()
        for i in range(5):
            link.send_status(RunState.RUNNING, 30.0, 100 + i)  # the pipeline keeps going meanwhile

        # plug back in (a new pty behind the same path)
        second = Pty()
        port.symlink_to(second.name)
        assert link.wait_connected(5)
        assert link.stats.reconnects == 1
        assert second.read_until(lambda ms: Status(RunState.RUNNING, 30.0, 104) in ms)
        second.write(encode_frame(Ping(5), 0))
        assert second.read_until(lambda ms: Pong(5) in ms)
        assert pings == [5]
    finally:
        link.close()
        first.unplug()
        if second is not None:
            second.unplug()
    delays = list(link.retry_delays)
    assert delays[:4] == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert max(delays) == pytest.approx(0.4)  # capped
    assert LinkState.CONNECTED in states and LinkState.RECONNECTING in states
    assert states.index(LinkState.RECONNECTING) > states.index(LinkState.CONNECTED)


def test_close_is_prompt_even_while_backing_off() -> None:
    link = SerialLink("/nonexistent/tty-smearsight", backoff_initial=5.0)
    link.start()
    assert wait_for(lambda: link.stats.open_failures >= 1, timeout=2)
    t0 = time.monotonic()
    link.close()
    assert time.monotonic() - t0 < 1.0
    assert not [t for t in threading.enumerate() if t.name.startswith("panel-link")]
