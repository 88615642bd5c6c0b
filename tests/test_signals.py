"""sharding.signals.StopSignals: the first SIGINT/SIGTERM interrupts, later ones are ignored."""

from __future__ import annotations

import os
import signal

import pytest

from sharding.signals import StopSignals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_interrupts_later_ones_are_ignored_until_exit(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt), StopSignals() as stop:
            try:
                os.kill(os.getpid(), sig)
                signal.sigtimedwait([], 0.1)  # let the handler run
                pytest.fail("the first signal did not interrupt")
            except KeyboardInterrupt:
                os.kill(os.getpid(), sig)  # a second press during cleanup: nothing happens
                os.kill(os.getpid(), signal.SIGINT)
                assert stop.count == 3
                raise
        # After an interrupt both stay ignored: a late signal cannot kill the exiting process.
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_without_a_signal_the_previous_handlers_come_back():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # e.g. inherited ignored by a background job
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        with StopSignals() as stop:
            assert callable(signal.getsignal(signal.SIGTERM))  # installed whatever was inherited
        assert stop.count == 0
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
