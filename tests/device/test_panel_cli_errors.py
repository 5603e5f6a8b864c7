"""What the panel commands say when the port never opens: the reason, not only "could not be opened"."""

from __future__ import annotations

from pathlib import Path

import pytest

from smearsight.cli import main
from smearsight.device.panel.link import SerialLink


def test_a_port_that_never_opens_is_reported_with_its_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "ttyUSB9"
    assert main(["device", "serial-monitor", str(missing), "--duration", "0.3"]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{missing}: could not be opened during the whole run (No such file or directory)" in err
    assert len(err.splitlines()) == 1
    assert main(["device", "panel-sim", str(tmp_path), "--script", "ping", "--duration", "0.3"]) == 1
    assert "(Is a directory)" in capsys.readouterr().err


def test_the_screen_line_names_the_port_and_the_reason_once() -> None:
    link = SerialLink("/nonexistent/ttyACM3", backoff_initial=0.05).start()
    try:
        link.wait_connected(0.3)
        line = link.status_line()
    finally:
        link.close()
    # before: "(... [Errno 2] could not open port /nonexistent/ttyACM3: [Errno 2] No such file or directory: '...')"
    assert line.startswith("panel: not connected, retrying in ")
    assert line.endswith("(/nonexistent/ttyACM3: No such file or directory)")
