"""The in-process ceiling (each runtime + precision on ready tensors) and the decode cost,
measured apart.

The ceiling is what the model itself can do on the server's cores with no HTTP, no multipart,
no JPEG decode: a service cannot beat it, and `service / ceiling` says how much serving costs.
Decode + preprocess is timed on the same photos the load test posts, per size class, because
the service pays it per request and the ceiling does not.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtests.payloads import Payload
from service.contract import ModelContract, load_and_preprocess
from service.runtime import open_runtime


@dataclass
class CeilingPoint:
    batch_size: int
    images_per_s: float      # median over repeats, wall clock
    ms_per_batch: float
    images_per_cpu_s: float  # images per CPU-second this process used: robust to a shared core


@contextlib.contextmanager
def cpu_affinity(cpus: str | None):
    """Run the block on the given CPUs ("1", "0-1"); threads created inside inherit them."""
    if not cpus:
        yield
        return
    wanted: set[int] = set()
    for part in cpus.split(","):
        low, _, high = part.partition("-")
        wanted.update(range(int(low), int(high or low) + 1))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, wanted)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def preprocessed(payloads: list[Payload], contract: ModelContract) -> np.ndarray:
    return np.stack([load_and_preprocess(p.data, contract) for p in payloads])


def runtime_ceiling(onnx_path: Path, tensors: np.ndarray, *, threads: int, cpus: str | None,
                    runtime: str = "onnxruntime", precision: str = "fp32",
                    batch_sizes: tuple[int, ...] = (1, 8, 16, 32), seconds: float = 2.0,
                    repeats: int = 3) -> list[CeilingPoint]:
    """Images/s of the service's own runtime (`service.runtime.open_runtime`, as the model
    service opens it) on preprocessed tensors at each batch size (median of repeats)."""
    points = []
    with cpu_affinity(cpus):
        model = open_runtime(onnx_path, runtime=runtime, precision=precision, threads=threads)
        for batch_size in batch_sizes:
            reps = -(-batch_size // len(tensors))
            batch = np.ascontiguousarray(np.concatenate([tensors] * reps)[:batch_size])
            model.run(batch)  # warm-up: allocations, kernel choice
            rates, latencies, cpu_rates = [], [], []
            for _ in range(repeats):
                runs, started, cpu_started = 0, time.perf_counter(), time.process_time()
                while True:
                    model.run(batch)
                    runs += 1
                    elapsed = time.perf_counter() - started
                    if elapsed >= seconds / repeats or runs >= 2000:
                        break
                rates.append(runs * batch_size / elapsed)
                latencies.append(1000 * elapsed / runs)
                cpu_rates.append(runs * batch_size / max(time.process_time() - cpu_started, 1e-9))
            points.append(CeilingPoint(batch_size, statistics.median(rates),
                                       statistics.median(latencies),
                                       statistics.median(cpu_rates)))
    return points


def decode_cost_ms(payloads: list[Payload], contract: ModelContract, *, cpus: str | None,
                   repeats: int = 3) -> dict[str, float]:
    """CPU ms per image of bytes -> model input (`load_and_preprocess`), per size class.

    CPU time, not wall time: on a shared core the wall clock also counts other processes.
    """
    by_class: dict[str, list[float]] = {}
    with cpu_affinity(cpus):
        for _ in range(repeats):
            for payload in payloads:
                started = time.process_time()
                load_and_preprocess(payload.data, contract)
                by_class.setdefault(payload.size_class, []).append(
                    1000 * (time.process_time() - started))
    costs = {size: statistics.fmean(times) for size, times in by_class.items()}
    # The load test posts every size class equally often: its cost is the mean of the classes.
    costs["mix"] = statistics.fmean(costs.values())
    return costs


def torch_eager_ceiling(run_dir: Path, tensors: np.ndarray, *, threads: int, cpus: str | None,
                        seconds: float = 2.0, repeats: int = 3) -> CeilingPoint:
    """The baseline's model alone: the run's checkpoint in PyTorch eager at batch 1, as the
    baseline app runs it per request. Bounds what any serving design can gain over it."""
    import torch

    from trainer.runs import load_trained

    with cpu_affinity(cpus):
        torch.set_num_threads(threads)
        model, _contract, _ = load_trained(run_dir)
        inputs = [torch.from_numpy(t[None]) for t in tensors]
        with torch.inference_mode():
            model(inputs[0])  # warm-up
            rates, latencies, cpu_rates = [], [], []
            for _ in range(repeats):
                runs, started, cpu_started = 0, time.perf_counter(), time.process_time()
                while True:
                    model(inputs[runs % len(inputs)])
                    runs += 1
                    elapsed = time.perf_counter() - started
                    if elapsed >= seconds / repeats or runs >= 2000:
                        break
                rates.append(runs / elapsed)
                latencies.append(1000 * elapsed / runs)
                cpu_rates.append(runs / max(time.process_time() - cpu_started, 1e-9))
    return CeilingPoint(1, statistics.median(rates), statistics.median(latencies),
                        statistics.median(cpu_rates))
