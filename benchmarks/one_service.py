"""The single-service alternative, kept for the topology benchmark (benchmarks/bench_service.py).

Decode, preprocess and ONNX Runtime all run inside one batchable BentoML API: BentoML can only
batch calls that arrive through an API, so in one service the decoding has to happen inside
the batch. `bentoml serve benchmarks.one_service:OneService` answers POST /classify with a list
(one prediction per posted `images` file). Not the served design: see BENCHMARKS.md.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import numpy as np

from service.contract import load_and_preprocess, softmax
from service.runtime import create_session, run_logits
from service.schemas import ModelRef, Prediction
from service.service import MODEL, settings


@bentoml.service(name="one-service", workers=settings.api_workers,
                 traffic={"timeout": settings.timeout_s})
class OneService:
    def __init__(self) -> None:
        self.contract = MODEL.contract
        self.session = create_session(MODEL.onnx_path, threads=settings.ort_threads,
                                      device=settings.device, spin_wait=settings.ort_spin_wait)
        self.decoders = ThreadPoolExecutor(settings.ort_threads)  # decode in parallel, at least
        self.model_ref = ModelRef(name=self.contract.name, version=self.contract.version)

    @bentoml.api(batchable=True, max_batch_size=settings.max_batch_size,
                 max_latency_ms=settings.max_latency_ms)
    def classify(self, images: list[Path]) -> list[Prediction]:
        tensors = list(self.decoders.map(
            lambda p: load_and_preprocess(p.read_bytes(), self.contract), images))
        scores = softmax(run_logits(self.session, np.stack(tensors)))
        top_k = min(settings.top_k, len(self.contract.labels))
        return [Prediction.from_scores(row, self.contract.labels, top_k=top_k,
                                       model=self.model_ref) for row in scores]
