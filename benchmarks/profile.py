"""Where the service's CPU time goes under load: py-spy samples, grouped into stages.

py-spy samples the stacks of the server and every worker it forked (`--subprocesses`) while
Locust keeps it busy; each sample is put in the first stage whose marker appears in its stack.
The shares answer "why is the service below the ceiling": model time vs decode vs HTTP and
multipart vs serialisation vs the hop between BentoML's API and model processes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# A sample goes to the stage of the innermost frame that names one of these markers: the
# code actually running, not a middleware that merely wraps every request.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    # OpenVINO's Python frame is InferRequest.infer in openvino/_ov_api.py: without it here the
    # default (OpenVINO) service's inference fell into "HTTP server" (71 % there, 2026-12-01).
    ("model inference (ONNX Runtime, OpenVINO)", ("run_logits", "onnxruntime_inference_collection",
                                                  "openvino/", "service/runtime.py")),
    ("JPEG decode + preprocess", ("load_and_preprocess", "decode_image", "(contract.py",
                                  "PIL/")),
    ("multipart parsing + upload files", ("multipart", "formparsers", "tempfile", "UploadFile",
                                          "_read_body", "_check_form", "_replay")),
    ("API -> model call (serialise, IPC)", ("to_async", "_bentoml_impl/client", "serde",
                                            "httpx", "httpcore", "aiohttp")),
    ("answer building (pydantic, JSON)", ("pydantic", "json", "_prediction", "softmax")),
    ("tracing + metrics (OpenTelemetry, Prometheus)", ("opentelemetry", "trace/", "_semconv",
                                                       "prometheus_client", "metrics")),
    ("batcher (BentoML dispatcher, batch assembly)", ("dispatcher.py", "container.py")),
    ("HTTP server, middleware, event loop", ("uvicorn", "starlette", "asyncio", "h11",
                                             "httptools", "anyio", "concurrent/futures",
                                             "bentoml", "threading")),
]


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def start_recording(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """Start `py-spy record` on pid and its children for `seconds`; None when py-spy is absent."""
    tool = py_spy()
    if tool is None:
        return None
    # Blocking mode: --nonblocking lost almost every sample on this busy 2-core machine.
    command = [tool, "record", "--pid", str(pid), "--subprocesses",
               "--duration", str(max(1, round(seconds))), "--rate", "50", "--format", "raw",
               "--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


IDLE_LEAVES = (".select (selectors.py", ".wait (threading.py", ".poll (selectors.py",
               "_worker (concurrent/futures/thread.py", ".get (queue.py", "sleep (")


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost first
        for stage, markers in STAGES:
            if any(marker in frame for marker in markers):
                return stage
    return "other Python"


def process_role_of(frames: list[str]) -> str:
    """api / model from the `process PID:"command line"` frames of a --subprocesses stack."""
    processes = " ".join(f for f in frames if f.startswith("process "))
    if "onnx-model" in processes:
        return "model"
    return "api" if "--service-name" in processes else "server"


def stage_shares_by_process(raw_path: Path) -> dict[str, dict[str, float]]:
    """Like `stage_shares`, per BentoML process role (api, model), as % of all busy samples:
    which process pays for which stage (the two servers each parse HTTP once per image)."""
    counts: dict[str, Counter[str]] = {}
    total = 0
    for frames, count in _busy_samples(raw_path):
        code = [f for f in frames if not f.startswith("process ")]
        counts.setdefault(process_role_of(frames), Counter())[stage_of(code)] += count
        total += count
    return {role: {stage: 100.0 * n / total for stage, n in stages.most_common()}
            for role, stages in sorted(counts.items())} if total else {}


def _busy_samples(raw_path: Path):
    """(frames, count) of each non-idle stack in py-spy's raw output."""
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        code = [f for f in frames if not f.startswith("process ")]
        if not code or any(idle in code[-1] for idle in IDLE_LEAVES):
            continue
        yield frames, int(count)


def stage_shares(raw_path: Path) -> dict[str, float]:
    """Percentage of busy samples per stage from py-spy's raw (collapsed stack) output.

    Samples whose innermost frame is a wait (event loop select, idle pool thread) are idle
    time, not work, and are left out; `--subprocesses` prefixes each stack with
    `process PID:"command line"` frames, which are stripped before matching.
    """
    counts: Counter[str] = Counter()
    for frames, count in _busy_samples(raw_path):
        counts[stage_of([f for f in frames if not f.startswith("process ")])] += count
    total = sum(counts.values())
    return {stage: 100.0 * n / total for stage, n in counts.most_common()} if total else {}
