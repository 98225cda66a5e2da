"""ONNX Runtime session for a contract-carrying classifier: providers, threads, I/O checks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.contract import ONNX_INPUT, ONNX_OUTPUT, ContractError, ModelContract

logger = logging.getLogger("product_classifier.service")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def choose_providers(device: str) -> list[str]:
    """CUDA first when onnxruntime-gpu is installed (and not turned off), CPU always as fallback."""
    available = ort.get_available_providers()
    if device in ("auto", "cuda") and CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise RuntimeError(f"CLASSIFIER_DEVICE=cuda but ONNX Runtime offers only {available}; "
                           "install onnxruntime-gpu (bentofile.gpu.yaml) on a machine with a GPU")
    return [CPU]


def create_session(model: Path | str | bytes, *, threads: int | None = None, device: str = "cpu",
                   spin_wait: bool = True, optimize: bool = True) -> ort.InferenceSession:
    """The one way this project opens an ONNX file (or bytes) with ONNX Runtime.

    `threads=None` keeps ORT's own pool size; `optimize=False` skips graph optimisation for a
    cheap look at metadata and I/O shapes.
    """
    options = ort.SessionOptions()
    # Explicit: by default ORT sizes its pool to every core of the host, and several workers
    # (or a container with a CPU quota) would then oversubscribe the machine.
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    # Idle pool threads spin for work by default; when the API process shares these cores,
    # that spinning steals its CPU (fewer req/s with spinning: BENCHMARKS.md, service section).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=choose_providers(device))
    if device == "cuda" and CUDA not in session.get_providers():
        raise RuntimeError(f"CUDA was asked for but ONNX Runtime fell back to "
                           f"{session.get_providers()} (no usable GPU or CUDA libraries)")
    logger.debug("ONNX Runtime session on %s, %s intra-op threads", session.get_providers()[0],
                 threads or "default")
    return session


def check_io(session: ort.InferenceSession, contract: ModelContract) -> None:
    """The graph must take [N,3,S,S] `input` and give [N,C] `logits` as the contract says."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if ONNX_INPUT not in inputs or ONNX_OUTPUT not in outputs:
        raise ContractError(f"the model must have input '{ONNX_INPUT}' and output '{ONNX_OUTPUT}'"
                            f", it has inputs {list(inputs)} and outputs {list(outputs)}")
    shape = inputs[ONNX_INPUT].shape
    expected = [3, contract.input_size, contract.input_size]
    fixed = [dim if isinstance(dim, int) else None for dim in shape[1:]]
    if len(shape) != 4 or any(d is not None and d != e for d, e in zip(fixed, expected)):
        raise ContractError(f"model input shape {shape} does not match the contract's "
                            f"[N, {', '.join(map(str, expected))}]")
    if isinstance(shape[0], int) and shape[0] != 1:
        raise ContractError(f"model input has a fixed batch size {shape[0]}; export it with a "
                            "dynamic batch axis so requests can be batched")


def check_model_file(onnx_path: Path, contract: ModelContract) -> None:
    """`check_io` on an unoptimised session: cheap enough to run before anything starts."""
    check_io(create_session(onnx_path, optimize=False), contract)


def run_logits(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    return session.run([ONNX_OUTPUT], {ONNX_INPUT: np.ascontiguousarray(batch, np.float32)})[0]
