"""A/B the service: variants served in turn, several rounds, medians side by side.

For performance work on the service: one change at a time, measured against what it replaces
in the same run, since single timings on a shared machine are noisy. A variant is either
service settings (`NAME:ENV=VALUE+ENV=VALUE`, e.g. `spin:CLASSIFIER_ORT_SPIN_WAIT=true`) or
another commit of this repository (`NAME@REV`, served from a temporary git worktree). Variants
are interleaved round by round (A B C A B C ...), so drift in the machine hits all of them.
Besides req/s it reports CPU milliseconds per request by BentoML process (API, model), which
shows where a change saved its time.

    python -m benchmarks.ab_serve --variants 'before@bb06f86,after' --rounds 3
    python -m benchmarks.ab_serve --variants 'spin:CLASSIFIER_ORT_SPIN_WAIT=true,default' \\
        --cpu-split shared
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict
from rich.console import Console
from rich.table import Table

from benchmarks.bench_serve import single_photo_scenario
from loadtests.locust_run import run_locust
from loadtests.servers import REPO, process_role, start_bentoml

console = Console(width=None if sys.stdout.isatty() else 150)


class AbServeConfig(BaseSettings):
    """Serve each variant in turn under the same closed-loop load; print medians per variant."""

    model_config = SettingsConfigDict(cli_prog_name="python -m benchmarks.ab_serve",
                                      cli_kebab_case=True, cli_implicit_flags=True)

    variants: list[str] = Field(description=(
        "comma-separated: NAME (as checked out), NAME:ENV=VALUE+ENV=VALUE (service settings), "
        "NAME@REV (a commit) or NAME@REV:ENV=VALUE (a commit with settings)"))
    model: Path = Field(REPO / "runs/bench-serve/export/model.onnx", description=(
        "ONNX file served by every variant (`make bench-serve` makes this one)"))
    rounds: int = Field(3, ge=1, description="times each variant is served and measured")
    users: int = Field(32, ge=1, description="closed-loop Locust users")
    duration_s: float = Field(15.0, gt=0, description="measured seconds per round")
    warmup_s: float = Field(3.0, ge=0, description="unmeasured load after each server start")
    cpu_split: Literal["pinned", "shared"] = Field("pinned", description=(
        "pinned: server on CPU 1, Locust on CPU 0 (taskset), 1 ONNX Runtime thread; shared: "
        "nothing pinned, 2 threads"))
    out: Path = Field(Path(tempfile.gettempdir()) / "ab_serve", description="logs, Locust CSV")

    def cli_cmd(self) -> None:
        run_ab(self)


@dataclass
class Variant:
    name: str
    settings: dict[str, str] = field(default_factory=dict)
    rev: str | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Variant:
        head, _, pairs = text.partition(":")
        name, _, rev = head.partition("@")
        settings = dict(pair.split("=", 1) for pair in pairs.split("+") if pair)
        return cls(name, settings, rev=rev or None)

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.rounds)


def checkout(rev: str, stack: ExitStack) -> Path:
    """A detached worktree of REV, removed when the run ends (the model is given by path)."""
    where = Path(tempfile.mkdtemp(prefix="ab-serve-"))
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(where), rev], cwd=REPO,
                   check=True, capture_output=True)
    stack.callback(subprocess.run, ["git", "worktree", "remove", "--force", str(where)],
                   cwd=REPO, check=False, capture_output=True)
    return where


def measure(variant: Variant, cwd: Path, config: AbServeConfig) -> dict[str, float]:
    pinned = config.cpu_split == "pinned"
    settings = {"CLASSIFIER_ORT_THREADS": "1" if pinned else "2", **variant.settings}
    scenario = single_photo_scenario()  # as bench-serve: one photo per request, 3 sizes
    loadgen = "0" if pinned else None
    with start_bentoml(str(config.model), cpus="1" if pinned else None,
                       settings=settings, log_dir=config.out, name=variant.name,
                       cwd=cwd) as server:
        if config.warmup_s:
            run_locust(server.url, config.users, config.warmup_s, config.out / "warmup",
                       cpus=loadgen, extra=scenario, timeout_s=config.warmup_s + 60)
        processes = server.tree()
        before = {p.pid: sum(p.cpu_times()[:2]) for p in processes}
        load = run_locust(server.url, config.users, config.duration_s,
                          config.out / variant.name, cpus=loadgen, extra=scenario,
                          timeout_s=config.duration_s + 90)
        cpu_ms = {"api": 0.0, "model": 0.0, "supervisor": 0.0}
        for proc in processes:
            role = process_role(proc)
            used = sum(proc.cpu_times()[:2]) - before[proc.pid]
            cpu_ms[role] = cpu_ms.get(role, 0.0) + 1000 * used / max(load.requests, 1)
    total_ms = sum(cpu_ms.values())
    return {"rps": load.rps, "req_per_cpu_s": 1000 / total_ms if total_ms else float("nan"),
            "api_ms": cpu_ms["api"], "model_ms": cpu_ms["model"], "p50_ms": load.p50_ms,
            "errors": load.failures}


def run_ab(config: AbServeConfig) -> list[Variant]:
    variants = [Variant.parse(text) for text in config.variants]
    config.out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        revs = {v.rev for v in variants if v.rev}
        worktrees = {rev: checkout(rev, stack) for rev in revs}  # one per commit, shared
        trees = {v.name: worktrees[v.rev] if v.rev else REPO for v in variants}
        for round_ in range(1, config.rounds + 1):
            for variant in variants:
                figures = measure(variant, trees[variant.name], config)
                variant.rounds.append(figures)
                console.print(f"round {round_} {variant.name:>12}: {figures['rps']:6.1f} req/s, "
                              f"{figures['req_per_cpu_s']:5.1f} req/CPU-s, CPU ms/request API "
                              f"{figures['api_ms']:.2f} model {figures['model_ms']:.2f}, "
                              f"errors {figures['errors']:.0f}")
    table = Table(title=f"ab_serve: medians of {config.rounds} rounds, {config.users} users, "
                        f"cores {config.cpu_split}")
    for column in ("variant", "req/s", "req/CPU-s", "API CPU ms/req", "model CPU ms/req",
                   "p50 ms", "errors", "vs first"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    first = variants[0].median("rps")
    for variant in variants:
        table.add_row(variant.name, f"{variant.median('rps'):.1f}",
                      f"{variant.median('req_per_cpu_s'):.1f}", f"{variant.median('api_ms'):.2f}",
                      f"{variant.median('model_ms'):.2f}", f"{variant.median('p50_ms'):.0f}",
                      f"{sum(r['errors'] for r in variant.rounds):.0f}",
                      f"{variant.median('rps') / first:.2f}x")
    console.print(table)
    return variants


def main() -> None:
    CliApp.run(AbServeConfig)


if __name__ == "__main__":
    main()
