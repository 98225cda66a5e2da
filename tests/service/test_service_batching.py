"""The batcher's cork window after a burst: BentoML's learnt window vs the fixed one we install.

Drives BentoML's real CorkDispatcher in-process with a callback that takes time like a model,
so the test checks the mechanism (the window a lone request will be held for), not a clock.
"""

from __future__ import annotations

import asyncio

import pytest
from bentoml._internal.marshal import dispatcher as bentoml_dispatcher

from service.batching import FixedWindowOptimizer, install_batch_window, stock_optimizer


async def _burst_then_window(max_batch_size: int = 16) -> tuple[float, list[int]]:
    """Warm up, run a 16-way burst, return the cork window a lone request would now get."""
    batches: list[int] = []

    async def model(batch):
        batches.append(len(batch))
        await asyncio.sleep(0.002 + 0.001 * len(batch))  # like a model: fixed + per-item cost
        return list(batch)

    dispatcher = bentoml_dispatcher.CorkDispatcher(
        max_latency_in_ms=10_000, max_batch_size=max_batch_size,
        fallback=lambda: None, get_batch_size=lambda _: 1)
    call = dispatcher(model)
    try:
        for i in range(12):  # BentoML's warm-up/training phase runs on the first requests
            assert await call(i) == i
        for _ in range(6):   # bursts: requests queue behind the busy model
            assert await asyncio.gather(*(call(i) for i in range(64))) == list(range(64))
        dispatcher.optimizer.trigger_refresh()  # what BentoML does every 5 s
        return dispatcher.optimizer.wait, batches
    finally:
        dispatcher.shutdown()


@pytest.fixture
def restore_optimizer():
    yield
    bentoml_dispatcher.Optimizer = stock_optimizer()


def test_stock_batcher_learns_a_long_window_from_a_burst(restore_optimizer):
    """The bug we fix: BentoML's own optimizer turns queueing into a cork window."""
    bentoml_dispatcher.Optimizer = stock_optimizer()
    window, batches = asyncio.run(_burst_then_window())
    assert max(batches) > 1
    assert window > 0.005, f"stock window {window * 1e3:.1f} ms; if BentoML fixed this, " \
                           "service/batching.py may be removed"


def test_fixed_window_stays_at_the_setting_after_a_burst(restore_optimizer):
    reported = []
    install_batch_window(0, observer=reported.append)
    window, batches = asyncio.run(_burst_then_window())
    assert window == 0.0
    assert max(batches) > 1, "batches must still form while the model is busy"
    assert reported and set(reported) == {0.0}


def test_fixed_window_is_the_configured_value(restore_optimizer):
    install_batch_window(3)
    assert bentoml_dispatcher.Optimizer is FixedWindowOptimizer
    window, _ = asyncio.run(_burst_then_window())
    assert window == pytest.approx(0.003)


def test_learnt_window_is_reported_when_kept(restore_optimizer):
    reported = []
    install_batch_window(None, observer=reported.append)
    window, _ = asyncio.run(_burst_then_window())
    assert window > 0.005 and reported[-1] == window
