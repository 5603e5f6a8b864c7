from smearsight import opencv_setup


def test_this_environment_has_exactly_one_pip_opencv():
    info = opencv_setup.inspect_opencv()
    assert info.importable and info.version
    assert len(info.pip_distributions) == 1, info.pip_distributions
    assert info.problems == []
    if info.pip_distributions == ["opencv-python-headless"]:
        assert info.gui is False and "headless" in info.origin


def test_two_pip_opencv_packages_are_flagged(monkeypatch):
    monkeypatch.setattr(opencv_setup, "installed_pip_opencv", lambda: ["opencv-python", "opencv-python-headless"])
    problems = opencv_setup.inspect_opencv().problems
    assert len(problems) == 1 and "more than one pip OpenCV package" in problems[0]


def test_build_information_parsing():
    info = "  Video I/O:\n    GStreamer:                   YES (1.20.3)\n  GUI:                           GTK3\n"
    assert opencv_setup._build_flag(info, "GStreamer") is True
    assert opencv_setup._build_value(info, "GUI") == "GTK3"
    assert opencv_setup._build_flag("    GStreamer:  NO\n", "GStreamer") is False
