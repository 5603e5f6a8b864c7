"""Ctrl-C is remembered: one swallowed by a finalizer still stops the next training step."""

from __future__ import annotations

import os
import signal
import time

import pytest

from smearsight.interrupts import raise_if_interrupted, signals_as_interrupt


@pytest.fixture(autouse=True)
def _ctrl_c_as_at_a_terminal():
    """pytest started with Ctrl-C ignored (``nohup``, a background job) passes that on; these tests need the
    default handler, as a terminal gives it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class _InterruptedWhileFreed:
    """Receives Ctrl-C while it is being freed: Python reports the KeyboardInterrupt as 'ignored' and goes on."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_the_next_step() -> None:
    with signals_as_interrupt():
        _InterruptedWhileFreed()  # freed at once; its KeyboardInterrupt goes nowhere
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    raise_if_interrupted()  # forgotten once the command is over
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_raises_at_once_and_is_remembered(signum) -> None:
    with signals_as_interrupt():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signum)
            time.sleep(1)
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()


def test_an_ignored_ctrl_c_stays_ignored() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup
    try:
        with signals_as_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            raise_if_interrupted()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
