"""gpt2.train.preemption: the first signal requests a checkpoint, the second kills; uninstall restores."""

from __future__ import annotations

import signal
import threading

from gpt2.train.preemption import PreemptionHandler
from tests.helpers import run_checkpoint_worker


def test_preemption_first_signal_requests_second_kills() -> None:
    proc = run_checkpoint_worker("signals", timeout=60)
    assert "requested=True signal=SIGUSR1 any=True" in proc.stdout
    assert "still alive" not in proc.stdout
    assert proc.returncode == -signal.SIGTERM
    assert proc.stderr.count("SIGUSR1 received; will save a checkpoint") == 1
    assert "second SIGTERM received" in proc.stderr


def test_preemption_uninstall_restores_and_thread_is_noop() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as handler:
        assert signal.getsignal(signal.SIGUSR1) == handler._handle
    assert signal.getsignal(signal.SIGTERM) == before and not handler.requested
    caught: list[Warning] = []

    def in_thread() -> None:
        import warnings

        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            PreemptionHandler().install()
        caught.extend(x.message for x in w)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert any("main thread" in str(m) for m in caught)
    assert signal.getsignal(signal.SIGTERM) == before
