"""A fixed batching window for BentoML's adaptive batcher, so latency recovers after a burst.

Why: BentoML 1.4's CorkDispatcher holds a lone request back for about `Optimizer.wait`, the mean
of recently *observed* queue waits. Under a burst, requests queue behind the busy model, so that
mean grows (tens of ms); after the burst every lone request is corked for that long, logs that
same wait, and keeps the mean up: a feedback loop that decays by only ~5 % per 5 s refresh
(measured here: p50 14 ms -> 83 ms after a 16-user burst). Upstream discussed a fix
(bentoml/BentoML#3630, closed unmerged).

Fix: the cork window is a setting, not a learnt value. With the default 0 the dispatcher runs a
batch as soon as the model is free; batches still form from the requests that arrived while the
previous batch ran, which is all the batching a CPU model gains from (ONNX Runtime's per-image
cost on CPU is flat from batch 1 to 32). The latency regression (`o_a`, `o_b`) that sheds load
past `max_latency_ms` is kept as it is.
"""

from __future__ import annotations

from bentoml._internal.marshal import dispatcher as _dispatcher

_StockOptimizer = _dispatcher.Optimizer


class FixedWindowOptimizer(_StockOptimizer):
    """BentoML's optimizer with `wait` pinned to `window_s` instead of the observed mean wait."""

    window_s: float = 0.0

    def __init__(self, max_latency: float):
        super().__init__(max_latency)
        self.wait = self.window_s

    def trigger_refresh(self) -> None:
        super().trigger_refresh()
        self.wait = self.window_s


def install_fixed_batch_window(window_ms: float) -> None:
    """Make every CorkDispatcher created from now on in this process use a fixed window.

    Call before BentoML builds the service's app (i.e. when the service module is imported):
    dispatchers look `Optimizer` up when they are constructed.
    """
    FixedWindowOptimizer.window_s = window_ms / 1000.0
    _dispatcher.Optimizer = FixedWindowOptimizer


def stock_optimizer() -> type:
    """BentoML's own optimizer class (the tests compare against it)."""
    return _StockOptimizer
