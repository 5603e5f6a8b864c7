"""The pipeline's side of the serial panel: publishes status and counts, collects the panel's commands.

Commands arrive on the link's reader thread; the run loop polls :meth:`PanelBridge.take_requests`
once per frame, so that nothing in the pipeline is touched from another thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass
class PanelRequests:
    """Session requests from the panel since the last poll."""

    start_session: str | None = None  # label of a session to start
    stop_session: bool = False


class PanelBridge:
    """Owns a :class:`~smearsight.device.panel.link.PanelLink` for the run loop."""

    def __init__(self, port: str, baudrate: int = 115200) -> None:
        from smearsight.device.panel.link import PanelLink
        from smearsight.device.panel.protocol import FreezeMode, MsgType

        self._lock = threading.Lock()
        self._pending = PanelRequests()
        self._captures = 0
        self._frozen = False
        self._freeze_mode = FreezeMode
        self.link = PanelLink(port, baudrate=baudrate)
        self.link.on(MsgType.FREEZE, self._on_freeze)
        self.link.on(MsgType.CAPTURE, lambda _frame: self._update(captures=1))
        self.link.on(MsgType.START_SESSION, lambda frame: self._update(start=frame.message.label))
        self.link.on(MsgType.STOP_SESSION, lambda _frame: self._update(stop=True))
        self.link.start()

    def _on_freeze(self, frame: Any) -> None:
        mode = frame.message.mode
        with self._lock:
            if mode == self._freeze_mode.TOGGLE:
                self._frozen = not self._frozen
            else:
                self._frozen = mode == self._freeze_mode.ON

    def _update(self, captures: int = 0, start: str | None = None, stop: bool = False) -> None:
        with self._lock:
            self._captures += captures
            if start is not None:
                self._pending.start_session = start
            self._pending.stop_session |= stop

    def take_requests(self) -> PanelRequests:
        """Session requests received since the last call (and clears them)."""
        with self._lock:
            pending, self._pending = self._pending, PanelRequests()
        return pending

    def take_captures(self) -> int:
        """How many captures were asked for since the last call (and clears the count)."""
        with self._lock:
            count, self._captures = self._captures, 0
        return count

    @property
    def frozen(self) -> bool:
        with self._lock:
            return self._frozen

    def publish(self, frame_index: int, fps: float, counts: dict[str, int], text: str, session: str) -> None:
        """Queue the latest status and counts (never blocks; older unsent ones are replaced)."""
        from smearsight.device.panel.protocol import RunState

        state = RunState.FROZEN if self.frozen else (RunState.ERROR if text else RunState.RUNNING)
        self.link.send_status(state, fps, frame_index, session, text)
        self.link.send_counts(counts, session, frame_index)

    def status_line(self) -> str:
        """Plain words for the screen when the panel is not connected (empty when all is well); they count down to
        the next retry, so see :meth:`problem` for the log."""
        return "" if self.link.connected else self.link.status_line()

    def problem(self) -> str:
        """The same trouble as :meth:`status_line` in words that stay the same while it lasts (to log and count
        once, not once per countdown step), or "" (also while the first connection is being made)."""
        why = self.link.last_error
        return f"panel: not connected ({why})" if why and not self.link.connected else ""

    def close(self, session: str, duration_s: float, frames: int, captures: int, counts: dict[str, int]) -> None:
        """Send the session summary and close the link (flushing what is queued)."""
        from smearsight.device.panel.protocol import Summary

        self.link.send_summary(Summary(session, duration_s, frames, captures, dict(counts)))
        self.link.flush(timeout=1.0)
        self.link.close()
