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

from collections.abc import Callable

from bentoml._internal.marshal import dispatcher as _dispatcher

_StockOptimizer = _dispatcher.Optimizer
_observer: Callable[[float], None] | None = None  # e.g. a Prometheus gauge's `set`


class FixedWindowOptimizer(_StockOptimizer):
    """BentoML's optimizer with `wait` pinned to `window_s` (None: BentoML's learnt value).

    Either way the window is reported to the observer after every refresh, so /metrics shows
    how long a lone request is being held back.
    """

    window_s: float | None = 0.0

    def __init__(self, max_latency: float):
        super().__init__(max_latency)
        self._apply_window()

    def trigger_refresh(self) -> None:
        super().trigger_refresh()
        self._apply_window()

    def _apply_window(self) -> None:
        if self.window_s is not None:
            self.wait = self.window_s
        if _observer is not None:
            _observer(self.wait)


def install_batch_window(window_ms: float | None,
                         observer: Callable[[float], None] | None = None) -> None:
    """Make every CorkDispatcher created from now on in this process use our optimizer.

    `window_ms=None` keeps BentoML's learnt window (to measure it). Call before BentoML builds
    the service's app (i.e. when the service module is imported): dispatchers look `Optimizer`
    up when they are constructed.
    """
    global _observer
    FixedWindowOptimizer.window_s = None if window_ms is None else window_ms / 1000.0
    _observer = observer
    _dispatcher.Optimizer = FixedWindowOptimizer


def stock_optimizer() -> type:
    """BentoML's own optimizer class (the tests compare against it)."""
    return _StockOptimizer
