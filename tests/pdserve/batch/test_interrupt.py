"""Ctrl-C during a batch is recorded by the handler and raised by the loop's next check."""

from __future__ import annotations

import os
import signal

import pytest

from pdserve.batch.interrupt import StopSignals


def test_signal_is_deferred_to_check_and_a_second_one_raises_at_once():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        stop.check()  # nothing received yet
        os.kill(os.getpid(), signal.SIGINT)  # handled here, between bytecodes: must not raise
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            stop.check()
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handlers are back


def test_an_exception_dropped_by_python_cannot_lose_the_interrupt():
    """The failure this guards against: KeyboardInterrupt raised inside a __del__ is printed and dropped."""

    class Dropper:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs inside __del__

    with StopSignals() as stop:
        Dropper()  # collected at once: __del__ runs, and anything it raises would be swallowed
        with pytest.raises(KeyboardInterrupt):
            stop.check()
