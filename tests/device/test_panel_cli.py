"""``smearsight device serial-monitor`` / ``panel-sim`` run as real processes against each other over ptys."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from smearsight.cli import main
from smearsight.device.panel.framing import encode_frame
from smearsight.device.panel.link import PanelLink
from smearsight.device.panel.nullmodem import VirtualNullModem
from smearsight.device.panel.protocol import Alert, AlertLevel, MsgType, RunState, Status

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs pseudo-terminals")


# The CLI with Ctrl-C (SIGINT) raising KeyboardInterrupt, as when started from a terminal: a test run
# started in the background by a non-interactive shell inherits SIGINT ignored, and so would the CLI.
_CLI_WITH_CTRL_C = (
    "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from smearsight.cli import entry; entry()"
)


class Proc:
    """A ``smearsight`` subprocess whose output lines are collected as they come."""

    def __init__(self, *args: str, stdin: int = subprocess.DEVNULL) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.p = subprocess.Popen(
            [sys.executable, "-c", _CLI_WITH_CTRL_C, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=stdin,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pred, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(pred(line) for line in list(self.lines)):
                return True
            if self.p.poll() is not None:
                self._t.join(2)
                return any(pred(line) for line in self.lines)
            time.sleep(0.02)
        return False

    def finish(self, timeout: float = 20.0) -> int:
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait()
        self._t.join(2)
        return rc

    def json_events(self) -> list[dict]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]


def test_monitor_decodes_panel_sim_traffic_and_counts_errors() -> None:
    with VirtualNullModem() as nm:
        monitor = Proc("device", "serial-monitor", nm.b, "--jsonl", "--duration", "60")
        try:
            assert monitor.wait_line(lambda s: '"connected"' in s), monitor.lines
            sim = Proc(
                "device",
                "panel-sim",
                nm.a,
                "--script",
                "ping,start,freeze,capture,stop",
                "--interval",
                "0.1",
                "--label",
                "slide-7",
            )
            assert sim.finish() == 0, sim.lines
            # line noise, a corrupted frame and a frame from a newer protocol, then a good frame
            corrupted = bytearray(encode_frame(Alert(AlertLevel.ERROR, "lamp failure", 5), 40))
            corrupted[corrupted.index(b"lamp")] ^= 0x40
            nm.inject("b", b"\x00NOISE\xff\xfe" + bytes(corrupted))
            nm.inject("b", encode_frame(Status(RunState.FROZEN, 0.0, 9, "", "done"), 41))
            assert monitor.wait_line(lambda s: '"FROZEN"' in s), monitor.lines
        finally:
            monitor.p.send_signal(signal.SIGINT)  # Ctrl-C: the monitor prints its counters and exits 0
            rc = monitor.finish()
    assert rc == 0, monitor.lines
    events = monitor.json_events()
    frames = [e["type"] for e in events if e["event"] == "frame"]
    assert frames == ["PING", "START_SESSION", "FREEZE", "CAPTURE", "STOP_SESSION", "STATUS"]
    start = next(e for e in events if e.get("type") == "START_SESSION")
    assert start["label"] == "slide-7"
    kinds = [e["kind"] for e in events if e["event"] == "error"]
    assert kinds == ["garbage", "crc"]
    stats = events[-1]
    assert stats["event"] == "stats" and stats["rx"]["crc_errors"] == 1 and stats["rx"]["garbage"] == 1
    assert stats["rx"]["frames"] == 6 and stats["rx"]["garbage_bytes"] == len(corrupted) - 1 + 8


def test_panel_sim_drives_the_runtime_link_and_shows_what_it_sends() -> None:
    with VirtualNullModem() as nm:
        link = PanelLink(nm.b)
        got: list[str] = []
        for code in (MsgType.START_SESSION, MsgType.STOP_SESSION, MsgType.FREEZE, MsgType.PING):
            link.on(code, lambda f: got.append(f.type_name))
        with link:
            assert link.wait_connected(2)
            sim = Proc("device", "panel-sim", nm.a, "--script", "ping,start,freeze,stop,ping", "--interval", "0.15")
            frame = 0
            while sim.p.poll() is None and frame < 2000:
                link.send_status(RunState.RUNNING, 29.97, frame, "S-9", "all good")
                link.send_counts({"sertoli": 3, "mature_sperm": frame % 50}, "S-9", frame)
                frame += 1
                time.sleep(0.02)
            rc = sim.finish()
    out = "\n".join(sim.lines)
    assert rc == 0, out
    assert got == ["PING", "START_SESSION", "FREEZE", "STOP_SESSION", "PING"]
    assert "STATUS" in out and "RUNNING 30.0 fps" in out and "all good" in out
    assert "COUNTS" in out and "sertoli=3" in out
    assert out.count("PONG") == 2 and "rtt" in out
    assert "ping rtt median" in out


def test_cli_bad_input_is_one_line_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["device", "panel-sim", "loop://", "--script", "ping,dance"]) == 1
    err = capsys.readouterr().err
    assert "--script" in err and "'dance'" in err and "ping" in err and len(err.strip().splitlines()) == 1
    assert main(["device", "panel-sim", "loop://", "--script", "ping", "--interval", "0"]) == 1
    assert "--interval" in capsys.readouterr().err
    assert main(["device", "panel-sim", "loop://", "--interactive", "--duration", "1"]) == 1
    assert "not a terminal" in capsys.readouterr().err
    assert main(["device", "serial-monitor", "/nonexistent/ttyUSB9", "--duration", "0.3"]) == 1
    assert "/nonexistent/ttyUSB9: could not be opened" in capsys.readouterr().err
    assert main(["device", "serial-monitor", "loop://", "--baud", "0"]) == 1


def test_cli_in_process_loop_url(capsys: pytest.CaptureFixture[str]) -> None:
    # panel-sim on loop:// hears its own commands: a complete in-process pass through the CLI code
    assert main(["device", "panel-sim", "loop://", "--script", "start,stop", "--interval", "0.05", "--jsonl"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [e["type"] for e in events if e["event"] == "sent"] == ["START_SESSION", "STOP_SESSION"]
    assert [e["type"] for e in events if e["event"] == "frame"] == ["START_SESSION", "STOP_SESSION"]
    argv = ["device", "panel-sim", "loop://", "--script", "ping,wait", "--interval", "0.05", "--repeat"]
    assert main([*argv, "--duration", "0.6", "--jsonl"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    nonces = [e["nonce"] for e in events if e["event"] == "sent"]
    assert len(nonces) >= 2 and nonces == list(range(1, len(nonces) + 1))
    assert main(["device", "serial-monitor", "loop://", "--duration", "0.2", "--stats-every", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "CRC errors" in out and "connected" in out


def test_panel_modules_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import smearsight.device.panel.cli, smearsight.device.panel.link, smearsight.device.panel.monitor\n"
        "import smearsight.device.panel.panel_sim, smearsight.device.panel.nullmodem\n"
        "assert 'cv2' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@contextlib.contextmanager
def _sim_on_a_terminal(typed_first: bytes = b"") -> Iterator[tuple[int, list[str], Proc]]:
    """A ``panel-sim`` whose stdin is a pseudo-terminal, talking to a PanelLink over a null modem; yields
    (the terminal's master fd to type into, the message types the link received, the process). ``typed_first``
    is typed before the simulator starts."""
    term_master, term_slave = os.openpty()
    with VirtualNullModem() as nm:
        link = PanelLink(nm.b)
        got: list[str] = []
        link.on_any(lambda f: got.append(f.type_name))
        with link:
            assert link.wait_connected(2)
            if typed_first:
                os.write(term_master, typed_first)
            sim = Proc("device", "panel-sim", nm.a, "--duration", "60", stdin=term_slave)
            try:
                yield term_master, got, sim
            finally:
                if sim.p.poll() is None:
                    sim.p.kill()
                os.close(term_master)
                os.close(term_slave)


def test_panel_sim_interactive_keys_from_a_terminal() -> None:
    """Keys typed on a (pseudo-)terminal: p ping, s start, f freeze, x stop, q quit."""
    with _sim_on_a_terminal() as (term, got, sim):
        assert sim.wait_line(lambda s: "connected" in s and "connecting" not in s), sim.lines
        for n, key in enumerate("psfx", start=1):
            os.write(term, key.encode())
            assert wait_until(lambda n=n: len(got) >= n), (key, got, sim.lines)
        os.write(term, b"q")
        rc = sim.finish()
    assert rc == 0, sim.lines
    assert got == ["PING", "START_SESSION", "FREEZE", "STOP_SESSION"]
    out = "\n".join(sim.lines)
    assert "keys:" in out and "PONG" in out and "rtt" in out


def test_panel_sim_keeps_a_key_typed_before_it_is_ready() -> None:
    """A key pressed while the simulator is still starting is acted on, not dropped."""
    with _sim_on_a_terminal(typed_first=b"p") as (term, got, sim):
        assert wait_until(lambda: "PING" in got), (got, sim.lines)
        os.write(term, b"q")
        rc = sim.finish()
    assert rc == 0, sim.lines


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())
