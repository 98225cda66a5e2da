"""`make bench-serve`: the serving benchmark, every variant side by side in one run.

On one trained model (a trainer run folder: checkpoint + export/model.onnx + model.int8.onnx):
  1. decode + preprocess cost per image (what the service pays and the ceiling does not);
  2. the ceiling of each runtime + precision (ONNX Runtime and OpenVINO, fp32 / bf16 / int8)
     in-process on preprocessed tensors, per batch size;
  3. the BentoML service as configured by default (`service`: CLASSIFIER_RUNTIME and
     _PRECISION auto), with batching off, and int8 (any runtime + precision can be forced with
     --variants, e.g. openvino-fp32), each at 1, 8 and 32 closed-loop Locust users: req/s,
     p50/p95/p99, errors, mean batch size (from /metrics), server CPU use, RSS, and cold start
     (`bentoml serve` -> /readyz 200);
  4. the baseline (FastAPI + PyTorch eager per request) under the same load.
Then a table, the ratios against their goals (e.g. service >= 3x baseline pinned), and a
verdict per goal with the reason when one is missed. The server and the load generator are
pinned to separate cores (taskset), so they do not steal from each other; the ceiling runs on
the server's core(s) with as many threads as the service.

    python -m benchmarks.bench_serve --run runs/demo
    python -m benchmarks.bench_serve --help
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict
from rich.console import Console

from benchmarks import ceiling, profile
from benchmarks.results import BenchResult, Step
from loadtests.locust_run import run_locust
from loadtests.payloads import DEFAULT_CATALOG, load_payloads
from loadtests.prom import mean_batch_size, scrape
from loadtests.servers import (
    BIN,
    REPO,
    ServerNotReady,
    ServerProcess,
    free_port,
    launch,
    start_bentoml,
)
from service.model_store import read_contract
from service.runtime import ONNXRUNTIME, OPENVINO, openvino_installed, openvino_supports

# Piped output (make, CI logs) would wrap the table at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 150)

# Service settings (env vars read by service/settings.py) per served variant.
BATCHING_OFF = {"CLASSIFIER_BATCHING": "false"}
# Each runtime + precision the service can be forced to (`service.runtime.variant_name`).
RUNTIME_VARIANTS = ["onnxruntime-fp32", "openvino-fp32", "openvino-bf16", "onnxruntime-int8",
                    "openvino-int8"]
VariantName = Literal["service", "nobatch", "int8", "baseline", "onnxruntime-fp32",
                      "openvino-fp32", "openvino-bf16", "onnxruntime-int8", "openvino-int8"]


def variant_settings(variant: str) -> dict[str, str]:
    """Service environment for a served variant (besides threads)."""
    if variant == "nobatch":
        return dict(BATCHING_OFF)
    if variant == "int8":
        return {"CLASSIFIER_PRECISION": "int8"}
    if variant in RUNTIME_VARIANTS:
        runtime, precision = variant.split("-")
        return {"CLASSIFIER_RUNTIME": runtime, "CLASSIFIER_PRECISION": precision}
    return {}


def unavailable(variant: str, int8: Path | None) -> str | None:
    """Why this machine cannot run a runtime variant, or None."""
    if variant not in RUNTIME_VARIANTS and variant != "int8":
        return None
    runtime, _, precision = variant.rpartition("-") if variant != "int8" else ("", "", "int8")
    if precision == "int8" and int8 is None:
        return "no int8 model (export with --int8)"
    if runtime == OPENVINO and not openvino_installed():
        return "openvino is not installed"
    if runtime == OPENVINO and not openvino_supports(precision):
        return f"this CPU has no native {precision}"
    return None


class BenchServeConfig(BaseSettings):
    """Measure the service against its ceiling and the plain baseline, in one run."""

    model_config = SettingsConfigDict(cli_prog_name="python -m benchmarks.bench_serve",
                                      cli_kebab_case=True, cli_implicit_flags=True,
                                      env_prefix="BENCH_")

    run: Path | None = Field(None, description=(
        "trainer run folder: checkpoints/best.pt (baseline), export/model.onnx (fp32) and "
        "export/model.int8.onnx (int8); exported first if export/ is missing"))
    model: Path | None = Field(None, description=(
        "fp32 .onnx to serve (default RUN/export/model.onnx)"))
    int8_model: Path | None = Field(None, description=(
        "int8 .onnx (default RUN/export/model.int8.onnx)"))
    users: list[int] = Field([1, 8, 32], description="concurrent closed-loop users per load step")
    duration_s: float = Field(20.0, gt=0, description="seconds of measured load per step")
    warmup_s: float = Field(4.0, ge=0, description="unmeasured load after each server start")
    # Every runtime + precision served in turn took 8 servers per core split (~25 min in all);
    # by default the ceiling covers each of them in-process and only these four are served.
    variants: list[VariantName] = Field(
        ["service", "nobatch", "int8", "baseline"], description=(
            "servers to measure: service (default settings: runtime and precision auto), "
            "nobatch, int8 (CLASSIFIER_PRECISION=int8), RUNTIME-PRECISION (forced: "
            f"{', '.join(RUNTIME_VARIANTS)}), baseline"))
    ceiling_variants: list[str] = Field(RUNTIME_VARIANTS, description=(
        "runtime + precision pairs whose in-process ceiling is measured (default: all)"))
    cpu_splits: list[Literal["pinned", "shared"]] = Field(["pinned", "shared"], description=(
        "how the server and Locust share the cores, each measured in turn: pinned: server on "
        "--server-cpus, Locust on --loadgen-cpus (taskset), per-core efficiency; shared: no "
        "pinning, the server may use every core (Locust needs ~5 % of one), as on a "
        "deployment box"))
    server_cpus: str = Field("1", description="cores for the server and the ceiling (pinned)")
    loadgen_cpus: str = Field("0", description="cores for Locust (pinned)")
    threads: int | None = Field(None, ge=1, description=(
        "ONNX Runtime / torch intra-op threads; default: the cores the server may use (1 "
        "pinned, all shared), which is also what torch picks by itself"))
    ceiling_batch_sizes: list[int] = Field([1, 8, 16, 32], description=(
        "batch sizes tried for the in-process ceiling; the best one counts"))
    ceiling_seconds: float = Field(3.0, gt=0, description="seconds per ceiling batch size")
    catalog: Path = Field(DEFAULT_CATALOG, description=(
        "photos posted by Locust and timed for decode"))
    sizes: str = Field("thumb,original,large", description="photo size classes posted")
    photos_per_label: int = Field(3, ge=1, description="photos per label, each in every size")
    out: Path = Field(REPO / "bench_out" / "serve", description=(
        "reports, logs, JSON, markdown: one sub-folder per core split"))
    profile: bool = Field(True, description=(
        "after the measured steps, py-spy the fp32 service under the largest load and report "
        "where its CPU time goes (not counted in the table: the profiler slows it)"))
    prepare_only: bool = Field(False, description=(
        "only make sure RUN has a trained, exported model (used by `make soak`), then exit"))

    def cli_cmd(self) -> None:
        if self.prepare_only:
            if self.run is None:
                raise SystemExit("--prepare-only needs --run RUN_DIR")
            prepare_run(self.run)
            return
        results = {split: run_bench(self, split) for split in self.cpu_splits}
        if len(results) > 1:
            from benchmarks.report import render_splits

            render_splits(results, self.out, max(self.users), console)


def start_baseline(run_dir: Path, port: int, *, cpus: str | None = None, threads: int = 1,
                   log_dir: Path = REPO / "reports", name: str = "baseline",
                   timeout_s: float = 120.0) -> ServerProcess:
    """The plain FastAPI/uvicorn + PyTorch-eager app (benchmarks/baseline_app.py)."""
    env = {"BASELINE_RUN_DIR": str(run_dir), "BASELINE_THREADS": str(threads)}
    command = [str(BIN / "python"), "-m", "uvicorn", "benchmarks.baseline_app:app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return launch(name, command, port=port, log_dir=log_dir, env=env, cpus=cpus,
                  timeout_s=timeout_s)


def _cpu_count(cpus: str) -> int:
    return sum(int(hi or lo) - int(lo) + 1
               for lo, _, hi in (part.partition("-") for part in cpus.split(",")))


def prepare_run(run_dir: Path) -> None:
    """Train a quick model on the demo catalogue and export it (fp32 + int8) if the run lacks
    one, with the trainer's own functions. Throughput does not depend on how well it is
    trained; the same weights go to the service (ONNX) and the baseline (checkpoint)."""
    from trainer.runs import RunDir

    run = RunDir(run_dir)
    if not run.best.is_file():
        from trainer.config import TrainConfig
        from trainer.train import train

        console.print(f"[yellow]{run.best} missing: training a head-only model on "
                      f"{DEFAULT_CATALOG} (about a minute)[/]")
        train(TrainConfig(data=DEFAULT_CATALOG, out=run_dir, epochs=0))
    if not (run.export / "model.onnx").is_file() or not (run.export / "model.int8.onnx").is_file():
        from trainer.export import export

        console.print(f"[yellow]exporting {run_dir} to ONNX (fp32 + int8)[/]")
        export(run_dir, int8=True, save=False)


def resolve_models(config: BenchServeConfig) -> tuple[Path, Path | None, Path | None]:
    """(fp32 onnx, int8 onnx or None, run dir or None)."""
    fp32, int8 = config.model, config.int8_model
    if config.run is not None:
        if fp32 is None:
            prepare_run(config.run)
        export = config.run / "export"
        fp32 = fp32 or export / "model.onnx"
        if int8 is None and (export / "model.int8.onnx").is_file():
            int8 = export / "model.int8.onnx"
    if fp32 is None:
        raise SystemExit("give --run RUN_DIR (a trainer run folder) or --model MODEL.onnx")
    if int8 is not None and Path(int8).resolve() != fp32.with_name("model.int8.onnx").resolve():
        raise SystemExit(f"--int8-model must be {fp32.with_name('model.int8.onnx')}: the service "
                         "serves CLASSIFIER_PRECISION=int8 from beside the fp32 file")
    return fp32, int8, config.run


def single_photo_scenario(sizes: str = "thumb,original,large", catalog: Path = DEFAULT_CATALOG,
                          photos_per_label: int = 3) -> list[str]:
    """Locust flags: only /classify, one photo per request, so req/s = images/s."""
    return ["--classify-weight", "1", "--batch-weight", "0", "--sizes", sizes,
            "--catalog", str(catalog), "--photos-per-label", str(photos_per_label)]


def measure_server(server: ServerProcess, variant: str, config: BenchServeConfig,
                   loadgen_cpus: str | None, result: BenchResult) -> None:
    label = "service" if variant != "baseline" else "baseline"
    extra = single_photo_scenario(config.sizes, config.catalog, config.photos_per_label)
    if config.warmup_s:
        run_locust(server.url, max(config.users), config.warmup_s,
                   config.out / f"{variant}_warmup", cpus=loadgen_cpus, extra=extra,
                   timeout_s=config.warmup_s + 60)
    for users in config.users:
        before_metrics = scrape(server.url) if label == "service" else {}
        cpu_before, wall_before = server.cpu_seconds(), time.perf_counter()
        load = run_locust(server.url, users, config.duration_s,
                          config.out / f"{variant}_u{users}", cpus=loadgen_cpus, extra=extra,
                          html=config.out / f"{variant}_u{users}.html",
                          timeout_s=config.duration_s + 90)
        cpu_used = server.cpu_seconds() - cpu_before
        cpu_pct = 100 * cpu_used / (time.perf_counter() - wall_before)
        step = Step(variant, users, load, server_cpu_pct=cpu_pct,
                    req_per_cpu_s=load.requests / cpu_used if cpu_used > 0 else math.nan,
                    rss_mb=server.rss_bytes() / 2**20)
        if label == "service":
            step.mean_batch, step.batches = mean_batch_size(before_metrics, scrape(server.url))
        result.steps.append(step)
        console.print(f"  {variant:>8} u={users:<3} {load.rps:7.1f} req/s  p50 {load.p50_ms:5.0f} "
                      f"p95 {load.p95_ms:5.0f} p99 {load.p99_ms:5.0f} ms  errors {load.failures}"
                      f"  batch {step.mean_batch:4.1f}  server CPU {cpu_pct:3.0f}% "
                      f"({step.req_per_cpu_s:.1f} req/CPU-s)  Locust CPU "
                      f"{load.loadgen_cpu_pct:3.0f}%")


def profile_server(server: ServerProcess, config: BenchServeConfig,
                   loadgen_cpus: str | None) -> dict[str, float]:
    """py-spy the server under the largest load; stage -> % of its CPU samples."""
    seconds = min(config.duration_s, 15.0)
    raw = config.out / "profile_service.txt"
    recorder = profile.start_recording(server.process.pid, seconds, raw)
    if recorder is None:
        console.print("[yellow]py-spy not installed: no profile (pip install py-spy)[/]")
        return {}
    run_locust(server.url, max(config.users), seconds + 2, config.out / "profile_load",
               cpus=loadgen_cpus, timeout_s=seconds + 90,
               extra=single_photo_scenario(config.sizes, config.catalog, config.photos_per_label))
    try:
        _, errors = recorder.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        recorder.kill()
        errors = b"timed out"
    if not raw.is_file():
        detail = errors.decode(errors="replace")[-300:]
        console.print(f"[yellow]py-spy wrote no profile: {detail}[/]")
        return {}
    shares = profile.stage_shares(raw)
    console.print("where the service's CPU time goes: " + ", ".join(
        f"{stage} {share:.0f}%" for stage, share in shares.items()))
    for role, stages in profile.stage_shares_by_process(raw).items():
        console.print(f"  {role} process ({sum(stages.values()):.0f}% of busy samples): " + ", ".join(
            f"{stage} {share:.1f}%" for stage, share in stages.items()))
    return shares


def run_bench(config: BenchServeConfig, cpu_split: str = "pinned") -> BenchResult:
    """Every variant under one core split; writes its report to OUT/<cpu_split>/."""
    config = config.model_copy(update={"out": config.out / cpu_split})
    config.out.mkdir(parents=True, exist_ok=True)
    pinned = cpu_split == "pinned"
    server_cpus = config.server_cpus if pinned else None
    loadgen_cpus = config.loadgen_cpus if pinned else None
    threads = config.threads or (_cpu_count(config.server_cpus) if pinned else os.cpu_count())
    fp32, int8, run_dir = resolve_models(config)
    contract = read_contract(fp32)
    payloads = load_payloads(config.catalog, config.photos_per_label,
                             tuple(config.sizes.split(",")))
    result = BenchResult(
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=f"{platform.node()} {os.cpu_count()} cores, load avg at start "
                f"{os.getloadavg()[0]:.1f}",
        cpu_split=(f"pinned: server on CPU {config.server_cpus}, Locust on CPU "
                   f"{config.loadgen_cpus} (taskset)" if pinned
                   else "shared: server and Locust unpinned, both may use every core"),
        threads=threads, decode_ms={}, ceiling={}, cold_start_s={})
    console.rule(f"bench-serve, cores {cpu_split}: {contract.name} {contract.version} "
                 f"({contract.architecture})")
    console.print(f"fp32 {fp32}\nint8 {int8}\n{result.cpu_split}; {threads} intra-op thread(s)")

    result.decode_ms = ceiling.decode_cost_ms(payloads, contract, cpus=server_cpus)
    console.print("decode+preprocess CPU ms/image: " + ", ".join(
        f"{k} {v:.1f}" for k, v in result.decode_ms.items()))
    tensors = ceiling.preprocessed(payloads[:16], contract)
    for name in config.ceiling_variants:
        runtime, _, precision = name.rpartition("-")
        if unavailable(name, int8):
            result.not_measured[f"ceiling {name}"] = unavailable(name, int8)
            continue
        path = int8 if precision == "int8" else fp32
        points = ceiling.runtime_ceiling(path, tensors, threads=threads, cpus=server_cpus,
                                         runtime=runtime or ONNXRUNTIME, precision=precision,
                                         batch_sizes=tuple(config.ceiling_batch_sizes),
                                         seconds=config.ceiling_seconds)
        result.ceiling[name] = [asdict(p) for p in points]
        console.print(f"ceiling {name}: " + ", ".join(
            f"b{p.batch_size} {p.images_per_s:.0f}/s ({p.images_per_cpu_s:.0f}/CPU-s)"
            for p in points))

    if run_dir is not None and "baseline" in config.variants:
        point = ceiling.torch_eager_ceiling(run_dir, tensors, threads=threads, cpus=server_cpus,
                                            seconds=config.ceiling_seconds)
        result.ceiling["torch eager"] = [asdict(point)]
        console.print(f"baseline's model alone (torch eager, batch 1): "
                      f"{point.images_per_s:.0f}/s ({point.images_per_cpu_s:.0f}/CPU-s)")

    service_env = {"CLASSIFIER_ORT_THREADS": str(threads)}
    for variant in config.variants:
        if unavailable(variant, int8):
            result.not_measured[variant] = unavailable(variant, int8)
            continue
        if variant == "baseline" and run_dir is None:
            result.not_measured[variant] = "no --run folder with a checkpoint"
            continue
        try:
            if variant == "baseline":
                server = start_baseline(run_dir, free_port(), cpus=server_cpus, threads=threads,
                                        log_dir=config.out)
            else:
                settings = dict(service_env, **variant_settings(variant))
                model = fp32  # int8 variants serve model.int8.onnx from beside it
                server = start_bentoml(str(model), cpus=server_cpus, settings=settings,
                                       log_dir=config.out, name=variant)
        except ServerNotReady as exc:
            result.not_measured[variant] = f"server did not start: {str(exc)[:300]}"
            console.print(f"[red]{variant}: {exc}[/]")
            continue
        result.cold_start_s[variant] = server.cold_start_s
        if variant != "baseline":
            card = httpx.get(f"{server.url}/model", timeout=10).json()
            result.served[variant] = f"{card['runtime']}-{card['precision']}"
        result.cold_start_cpu_s[variant] = server.cpu_seconds()
        console.print(f"[bold]{variant}[/] ready in {server.cold_start_s:.1f}s (cold start, "
                      f"{result.cold_start_cpu_s[variant]:.1f} CPU-s)")
        with server:
            measure_server(server, variant, config, loadgen_cpus, result)
            if variant == "service" and config.profile:
                result.profile = profile_server(server, config, loadgen_cpus)
    from benchmarks.report import render  # rich table + ratios + verdicts + markdown

    render(result, config.out, max(config.users), console)
    return result


def main() -> None:
    CliApp.run(BenchServeConfig)


if __name__ == "__main__":
    main()
