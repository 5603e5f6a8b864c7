"""systemd units and udev rules: well-formed, wired to real CLI options, shipped in the wheel."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from smearsight.cli import main
from smearsight.deploy.systemd import UNIT_FILES, read_unit


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), raw
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None and re.fullmatch(r"[A-Za-z]+", key), raw
        current.setdefault(key, []).append(value)
    return sections


def test_runtime_unit_has_watchdog_restart_and_rollback():
    unit = parse_unit(read_unit("smearsight-runtime.service"))
    service = unit["Service"]
    assert service["Type"] == ["notify"] and int(service["WatchdogSec"][0]) > 0
    assert service["Restart"] == ["on-failure"] and service["NotifyAccess"] == ["main"]
    assert unit["Unit"]["OnFailure"] == ["smearsight-rollback.service"]
    assert "deploy health-check" in service["ExecStartPre"][0]
    assert "--confirm" in service["ExecStartPost"][0]
    assert "/var/lib/smearsight/current/models" in service["ExecStart"][0]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_update_timer_and_service():
    timer = parse_unit(read_unit("smearsight-update.timer"))
    assert timer["Timer"]["Unit"] == ["smearsight-update.service"]
    # monotonic timers: a check after boot, then hourly (Persistent= would be ignored without OnCalendar=)
    assert timer["Timer"]["OnBootSec"] == ["5min"] and timer["Timer"]["OnUnitActiveSec"] == ["1h"]
    assert "Persistent" not in timer["Timer"] or "OnCalendar" in timer["Timer"]
    assert timer["Install"]["WantedBy"] == ["timers.target"]
    service = parse_unit(read_unit("smearsight-update.service"))["Service"]
    assert service["Type"] == ["oneshot"] and "deploy update --repo ${SMEARSIGHT_REPO}" in service["ExecStart"][0]


def _smearsight_commands():
    for name in UNIT_FILES:
        if not name.endswith((".service", ".timer")):
            continue
        for section in parse_unit(read_unit(name)).values():
            for key, values in section.items():
                for value in values if key.startswith("Exec") else []:
                    args = shlex.split(value.lstrip("-+"))
                    if args and args[0].endswith("/smearsight"):
                        yield name, args[1:]


@pytest.mark.parametrize("unit, args", list(_smearsight_commands()))
def test_unit_commands_use_real_cli_options(unit, args, capsys):
    if args[0] == "run":
        pytest.importorskip("smearsight.runtime.cli")
    args = [a.replace("${SMEARSIGHT_REPO}", "http://127.0.0.1:1") for a in args]
    assert main([*args, "--help"]) == 0, (unit, args, capsys.readouterr().err)


def test_udev_rules_syntax():
    item = re.compile(r'^[A-Z_]+(\{[A-Za-z_]+\})?(==|!=|\+=|=|:=)"[^"]*"$')
    rules = [line for line in read_unit("99-smearsight.rules").splitlines() if line and not line.startswith("#")]
    assert len(rules) == 2
    for rule in rules:
        for part in rule.split(", "):
            assert item.match(part), part
    assert 'SYMLINK+="smearsight-camera"' in rules[0] and 'SUBSYSTEM=="video4linux"' in rules[0]
    assert 'SYMLINK+="smearsight-panel"' in rules[1] and 'SUBSYSTEM=="tty"' in rules[1]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    import sys

    exe = Path(sys.executable).with_name("smearsight")
    if not exe.exists():
        pytest.skip("no smearsight console script next to the interpreter")
    assert main(["deploy", "units", "--out", str(tmp_path), "--smearsight-bin", str(exe)]) == 0
    units = sorted(str(p) for p in tmp_path.iterdir() if p.suffix in {".service", ".timer"})
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                          timeout=120)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if "smearsight" in line]
    assert not complaints, complaints


def test_units_command_substitutes_paths(tmp_path, capsys):
    assert main(["deploy", "units", "--out", str(tmp_path), "--smearsight-bin", "/usr/local/bin/smearsight",
                 "--root-dir", "/data/smearsight"]) == 0
    text = (tmp_path / "smearsight-runtime.service").read_text()
    assert "/usr/local/bin/smearsight deploy health-check --root-dir /data/smearsight" in text
    assert "/opt/smearsight" not in text and "/var/lib/smearsight" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(UNIT_FILES)


def test_units_on_a_full_disk_or_into_a_file_is_one_line(tmp_path, tmpfs, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["deploy", "units", "--out", str(blocker)]) == 1
    assert "is a file" in capsys.readouterr().err
    with tmpfs("full", "size=8k") as full:
        rc = main(["deploy", "units", "--out", str(full), "--smearsight-bin", "/" + "a" * 20000])
        err = capsys.readouterr().err
        assert rc == 1 and "cannot write" in err and "No space left" in err
        assert not [p for p in full.iterdir() if p.name.endswith(".tmp")]  # nothing half-written


def test_every_shipped_file_matches_the_package_data_globs():
    import fnmatch

    tomllib = pytest.importorskip("tomllib")

    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["*"]
    assert (root / "deploy" / "systemd" / "__init__.py").is_file()  # a package, so its data ships
    for name in UNIT_FILES:
        assert (root / "deploy" / "systemd" / name).is_file()
        assert any(fnmatch.fnmatch(name, g) for g in globs), name


@pytest.mark.parametrize("option, value, expected", [
    ("--root-dir", "/data/smear sight", "' '"),
    ("--smearsight-bin", "/opt/my venv/bin/smearsight", "' '"),
    ("--root-dir", "/data/\tx", "'\\t'"),
    ("--root-dir", "/data/50%", "'%'"),
    ("--smearsight-bin", "/opt/$HOME/smearsight", "'$'"),
    ("--root-dir", "data/smearsight", "not an absolute path"),
])
def test_units_refuse_paths_that_break_unit_files(tmp_path, capsys, option, value, expected):
    out = tmp_path / "units"
    assert main(["deploy", "units", "--out", str(out), option, value]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0] and expected in err[0], err
    assert not out.exists()
