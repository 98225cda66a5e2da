"""The inference runtimes: `run(batch) -> logits` on ONNX Runtime or OpenVINO, and which to use.

`create_session` stays the one way this project opens an ONNX file with ONNX Runtime; OpenVINO
(CPU only here) compiles the same file. Neither imports torch.
"""

from __future__ import annotations

import importlib.util
import logging
import platform
import threading
from pathlib import Path
from typing import Protocol

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


ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
X86_64 = {"x86_64", "amd64"}


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def int8_products_saturate(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on an x86 CPU without VNNI (AVX2 only, e.g. AMD Zen 3, Intel before Ice Lake):
    ONNX Runtime's uint8 x int8 kernels there add pairs of products in int16 (vpmaddubsw),
    which 8-bit weights can overflow (2 x 255 x 127 > 32767) and 7-bit weights cannot
    (`trainer export --int8 --int8-reduce-range`). False with VNNI, off x86, or unknown."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return False
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), None)
    except OSError:
        return False
    return flags is not None and not {"avx512_vnni", "avx_vnni"} & set(flags)


def choose_runtime(runtime: str = "auto", device: str = "auto") -> tuple[str, str]:
    """(runtime, device) to serve with: `runtime` is auto, onnxruntime or openvino.

    auto: ONNX Runtime's CUDA provider when onnxruntime-gpu is installed (and the device is
    not forced to cpu), else OpenVINO on an x86-64 CPU where it is installed (measured 1.6-2.1x
    ONNX Runtime's images/s on this CNN), else ONNX Runtime's CPU provider.
    """
    if runtime == OPENVINO:
        if device == "cuda":
            raise RuntimeError("CLASSIFIER_RUNTIME=openvino runs on the CPU here; CUDA is served "
                               "by CLASSIFIER_RUNTIME=onnxruntime (onnxruntime-gpu)")
        if not openvino_installed():
            raise RuntimeError("CLASSIFIER_RUNTIME=openvino but openvino is not installed; "
                               "pip install openvino (bentofile.yaml carries it)")
        return OPENVINO, "cpu"
    # device=cuda is taken at its word here: `bentoml build -f bentofile.gpu.yaml` imports the
    # service on a build machine without a GPU; the session checks CUDA when it opens.
    cuda = device == "cuda" or (device == "auto" and CUDA in ort.get_available_providers())
    if runtime == ONNXRUNTIME or cuda:
        return ONNXRUNTIME, "cuda" if cuda else "cpu"
    if platform.machine().lower() in X86_64 and openvino_installed():
        return OPENVINO, "cpu"
    return ONNXRUNTIME, "cpu"


class Runtime(Protocol):
    """One compiled model: float32 [N,3,S,S] normalised input -> float32 [N,C] logits."""

    name: str       # onnxruntime | openvino
    precision: str  # the arithmetic it runs: fp32, bf16 or int8
    device: str     # cpu | cuda

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def variant_name(runtime: str, precision: str) -> str:
    """The key the accuracy gate records a runtime + precision under, e.g. openvino-bf16."""
    return f"{runtime}-{precision}"


class OrtRuntime:
    name = ONNXRUNTIME

    def __init__(self, path: Path, *, precision: str = "fp32", threads: int | None = None,
                 device: str = "cpu", spin_wait: bool = False):
        if precision == "bf16":
            raise RuntimeError("bf16 is served by OpenVINO (CLASSIFIER_RUNTIME=openvino); "
                               "ONNX Runtime serves fp32 and int8")
        self.session = create_session(path, threads=threads, device=device, spin_wait=spin_wait)
        self.precision = precision
        self.device = "cuda" if CUDA in self.session.get_providers() else "cpu"

    def run(self, batch: np.ndarray) -> np.ndarray:
        return run_logits(self.session, batch)

    def run_outputs(self, batch: np.ndarray, names: list[str]) -> np.ndarray:
        """Several outputs of one run, side by side: [N, sum of their widths]."""
        return np.concatenate(self.session.run(
            names, {ONNX_INPUT: np.ascontiguousarray(batch, np.float32)}), axis=1)


# OpenVINO's names for the precisions the accuracy gate checks.
OV_HINTS = {"fp32": "f32", "bf16": "bf16"}


def openvino_supports(precision: str) -> bool:
    """bf16 needs a CPU that OpenVINO runs it on natively (AVX512-BF16 / AMX)."""
    import openvino as ov

    return precision != "bf16" or "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoRuntime:
    """The ONNX file compiled by OpenVINO for the CPU, one inference stream.

    `precision` fp32 or bf16 sets the inference precision of the fp32 file; for the int8 file
    OpenVINO runs its quantized ops in int8 and the rest at its default precision (as the
    accuracy gate measured it).
    """

    name = OPENVINO
    device = "cpu"

    def __init__(self, path: Path, *, precision: str = "fp32", threads: int | None = None):
        import openvino as ov

        if not openvino_supports(precision):
            raise RuntimeError("CLASSIFIER_PRECISION=bf16 but this CPU has no native bf16 "
                               "(OpenVINO reports no BF16 capability); serve fp32 or int8")
        config: dict = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                        # Pinned threads would fight the API process for the cores they share.
                        "ENABLE_CPU_PINNING": False}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if precision in OV_HINTS:
            config["INFERENCE_PRECISION_HINT"] = OV_HINTS[precision]
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.precision = precision
        self._local = threading.local()  # an infer request is not thread-safe: one per thread

    def run(self, batch: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer({0: np.ascontiguousarray(batch, np.float32)}, share_outputs=False)
        return result[self.compiled.output(0)]

    def run_outputs(self, batch: np.ndarray, names: list[str]) -> np.ndarray:
        """Several outputs of one inference, side by side: [N, sum of their widths]."""
        self.run(batch)
        request = self._local.request
        return np.concatenate([request.get_tensor(self.compiled.output(name)).data.copy()
                               for name in names], axis=1)


def open_runtime(path: Path, *, runtime: str, precision: str = "fp32",
                 threads: int | None = None, device: str = "cpu",
                 spin_wait: bool = False) -> Runtime:
    """A compiled model on `runtime` (onnxruntime | openvino, as `choose_runtime` gives)."""
    if runtime == OPENVINO:
        return OpenVinoRuntime(path, precision=precision, threads=threads)
    return OrtRuntime(path, precision=precision, threads=threads, device=device,
                      spin_wait=spin_wait)
