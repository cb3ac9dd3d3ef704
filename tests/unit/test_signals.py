"""stop_on_signals: the first SIGTERM/SIGINT asks for a stop; a forwarded echo is not a second request; a real
second request exits at once; the previous handlers come back."""

import os
import signal

import pytest

from hf_audio_trainer import loop


def test_first_signal_sets_the_flag_and_an_echo_does_not_exit():
    before = signal.getsignal(signal.SIGTERM)
    with loop.stop_on_signals() as flag:
        assert flag["stop"] is False
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag["stop"] is True
        os.kill(os.getpid(), signal.SIGINT)  # torchrun forwarding the same preemption a moment later
        assert flag["stop"] is True
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_later_second_signal_exits_at_once(monkeypatch):
    monkeypatch.setattr(loop, "SIGNAL_ECHO", 0.0)
    with loop.stop_on_signals() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag["stop"] is True
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGTERM)
    assert exit_info.value.code == 128 + signal.SIGTERM
