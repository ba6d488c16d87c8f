"""The stop signals (SIGTERM, SIGINT, SIGHUP) of a serving process, from its first line on.

``routesvc serve`` spends over a second importing and reading its configuration before its
event loop can handle a signal. Until a handler is set, a signal has its default action, and
for PID 1 in a container (no init before it) the default action of SIGTERM and SIGHUP is none:
the kernel drops the signal, and the process goes on to serve until the kill that follows.

So a serving process takes the signals first (``note_stop_signals``): one that comes while it
imports is noted. Once the imports are done, start-up runs under ``stop_on_signals``: a noted
signal, or one that comes later, raises ``StopSignal`` where start-up is, which ends it cleanly
without serving, until the server's event loop takes the signals over and drains on them.
The heavy imports come before; a module start-up loads lazily (a provider's batch adapter and
its SDK) can still be cut short, and Python then raises another error from the ``StopSignal``
(a ``RuntimeError`` from a class body): ``stop_signal_in`` finds the signal behind it, so that
start-up still ends as the signal asked, not with a traceback.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_noted: list[int] = []


class StopSignal(BaseException):
    """A stop signal came while the process was starting.

    A ``BaseException``, as ``KeyboardInterrupt`` is, so that no ``except Exception`` on the way
    out of start-up takes it for a failure."""

    def __init__(self, signum: int) -> None:
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


def _note(signum: int, frame: FrameType | None) -> None:
    _noted.append(signum)


def _raise(signum: int, frame: FrameType | None) -> None:
    # Raised once: the clean exit that follows runs with any later signal only noted.
    _handle_with(_note)
    raise StopSignal(signum)


def _handle_with(handler: Callable[[int, FrameType | None], None]) -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def note_stop_signals() -> None:
    """Note the stop signals from now on, and let them through where they are blocked: a
    process started with them blocked (a supervisor's worker) gets one sent meanwhile now."""
    _handle_with(_note)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def stop_on_signals() -> None:
    """Raise ``StopSignal`` for a stop signal from now on: at once for one already noted.

    Does nothing in a process that did not take the signals (a test calling the command line),
    whose handlers stay its own."""
    if signal.getsignal(signal.SIGTERM) is not _note:
        return
    _handle_with(_raise)
    if _noted:  # checked after the switch, so that none noted in between is missed
        _handle_with(_note)
        raise StopSignal(_noted[0])


def stop_signal_in(error: BaseException) -> StopSignal | None:
    """The ``StopSignal`` that ``error`` is, or that it was raised from or while handling (an
    import the signal cut short ends in another error); None when no signal is behind it."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, StopSignal):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
