"""training/trainer.py: the stop request that SIGINT / SIGTERM make when train.py runs as a program."""

import signal

from training.trainer import StopRequest


def test_stop_request_handles_signals_only_when_asked_and_restores_the_handlers(capsys):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopRequest(handle_signals=False) as stop:
        assert {sig: signal.getsignal(sig) for sig in before} == before
        assert stop.signal is None
    with StopRequest(handle_signals=True) as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        signal.raise_signal(signal.SIGTERM)
        assert stop.signal == "SIGTERM"
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert "SIGTERM: finishing this step and saving the state (Ctrl-C again aborts)" in capsys.readouterr().err
