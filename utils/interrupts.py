"""Stop cleanly on Ctrl-C or SIGTERM. GracefulStop is training's: the first signal asks the loop
to stop after the current step (it then checkpoints and exits); a second one interrupts at
once. CaughtSignals is what it shares with search.py's StopSignals (utils/trial_process.py)."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Self

from utils import console

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CaughtSignals:
    """Context manager that records the first SIGINT or SIGTERM instead of letting it end the
    process; a subclass adds what else a signal does in `_handle`."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        # handlers can only be installed from the main thread; elsewhere signals keep their
        # default behaviour
        if threading.current_thread() is threading.main_thread():
            for number in HANDLED_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.signal_number = self.signal_number or number

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def exit_code(self) -> int:
        """The shell convention for death by signal: 128 + its number (130 for Ctrl-C)."""
        assert self.signal_number is not None, "no stop signal was received"
        return 128 + self.signal_number

    @property
    def name(self) -> str:
        assert self.signal_number is not None, "no stop signal was received"
        return signal.Signals(self.signal_number).name


class GracefulStop(CaughtSignals):
    """The first stop signal is recorded (the loop stops after its step); a second raises
    KeyboardInterrupt."""

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.signal_number is not None:
            raise KeyboardInterrupt
        self.signal_number = number
        console.warn(f"{signal.Signals(number).name} received: stopping after this step "
                     "(send it again to quit at once)")

    def adopt(self, number: int) -> None:
        """Stop as if signal `number` had arrived here: another training process received it."""
        if self.signal_number is None:
            self.signal_number = number
