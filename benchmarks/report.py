"""Turn a bench-serve result into the table, the ratios and a verdict per goal.

Printed with rich and written as markdown (bench_out/serve/<split>/bench_serve.md, and both
splits side by side in bench_out/serve/bench_serve.md) so the same figures go into
BENCHMARKS.md unedited.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.results import BenchResult, Step, load_result, save

# Goals: the service against the torch-eager baseline by core split (on the whole machine the
# baseline also loses to thread oversubscription, so more is asked there), the in-process
# ceiling and the cold start.
GOAL_VS_BASELINE = {"pinned": 3.0, "shared": 5.0}
GOAL_VS_CEILING = 0.5
GOAL_COLD_START_S = 5.0

SHORT_NAMES = {"service": "service default", "nobatch": "service, no batching",
               "int8": "service int8", "baseline": "baseline torch eager"}
VARIANT_NAMES = {"service": "service default runtime, batching on",
                 "nobatch": "service default runtime, batching off",
                 "int8": "service int8, batching on", "baseline": "baseline FastAPI + torch eager"}
# Ceilings were recorded as fp32/int8 (ONNX Runtime) before there was a runtime choice.
CEILING_ALIASES = {"fp32": "onnxruntime-fp32", "int8": "onnxruntime-int8"}


def variant_title(variant: str, short: bool = False) -> str:
    names = SHORT_NAMES if short else VARIANT_NAMES
    return names.get(variant, f"service {variant}" + ("" if short else ", batching on"))


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _times(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def _step(result: BenchResult, variant: str, users: int) -> Step | None:
    return next((s for s in result.steps if s.variant == variant and s.users == users), None)


def _ceiling_points(result: BenchResult, name: str) -> list[dict]:
    return result.ceiling.get(name) or result.ceiling.get(CEILING_ALIASES.get(name, "")) or []


def best_ceiling(result: BenchResult, name: str) -> tuple[float, int]:
    points = _ceiling_points(result, name)
    if not points:
        return math.nan, 0
    best = max(points, key=lambda p: p["images_per_s"])
    return best["images_per_s"], best["batch_size"]


def best_ceiling_cpu(result: BenchResult, name: str) -> float:
    points = _ceiling_points(result, name)
    return max((p["images_per_cpu_s"] for p in points), default=math.nan)


def summary(result: BenchResult, users: int) -> dict:
    """The ratios and verdicts at `users` (the largest load step).

    Each throughput ratio comes twice: on wall-clock req/s (what the goals name) and
    on requests per CPU-second of the server (robust when other processes share the server's
    core: on a quiet core a CPU-bound server turns its CPU efficiency straight into req/s).
    """
    steps = {v: _step(result, v, users) for v in VARIANT_NAMES}
    served = result.served.get("service")
    # The default service is measured against the ceiling of what it serves.
    ceiling_name = served if served and _ceiling_points(result, served) else "fp32"
    rps = {v: (s.load.rps if s else math.nan) for v, s in steps.items()}
    eff = {v: (s.req_per_cpu_s if s else math.nan) for v, s in steps.items()}
    ceiling_fp32, best_batch = best_ceiling(result, ceiling_name)
    ceiling_int8, _ = best_ceiling(result, "int8")
    ceiling_cpu = best_ceiling_cpu(result, ceiling_name)
    torch_cpu = best_ceiling_cpu(result, "torch eager")
    decode_ms = result.decode_ms.get("mix", math.nan)
    # A server that decodes and infers on the same cores pays both per image.
    with_decode_cpu = 1.0 / (1.0 / ceiling_cpu + decode_ms / 1000.0) \
        if ceiling_cpu and not math.isnan(ceiling_cpu) else math.nan
    service = steps["service"]
    return {
        "users": users, "rps": rps,
        "goal_vs_baseline": GOAL_VS_BASELINE.get(result.cpu_split.split(":")[0].strip(),
                                                 GOAL_VS_BASELINE["pinned"]), "req_per_cpu_s": eff, "ceiling_name": ceiling_name,
        "served": served,
        "ceiling_fp32": ceiling_fp32, "best_batch": best_batch, "ceiling_int8": ceiling_int8,
        "ceiling_fp32_per_cpu_s": ceiling_cpu, "decode_ms": decode_ms,
        "torch_eager_per_cpu_s": torch_cpu,
        "runtime_fp32_vs_torch": _ratio(ceiling_cpu, torch_cpu),
        "runtime_int8_vs_torch": _ratio(best_ceiling_cpu(result, "int8"), torch_cpu),
        "int8_vs_baseline": _ratio(rps["int8"], rps["baseline"]),
        "ceiling_with_decode_per_cpu_s": with_decode_cpu,
        "service_vs_ceiling": _ratio(rps["service"], ceiling_fp32),
        "service_vs_ceiling_cpu": _ratio(eff["service"], ceiling_cpu),
        "service_vs_ceiling_with_decode_cpu": _ratio(eff["service"], with_decode_cpu),
        "batching_on_vs_off": _ratio(rps["service"], rps["nobatch"]),
        "batching_on_vs_off_cpu": _ratio(eff["service"], eff["nobatch"]),
        "service_vs_baseline": _ratio(rps["service"], rps["baseline"]),
        "service_vs_baseline_cpu": _ratio(eff["service"], eff["baseline"]),
        "int8_vs_fp32": _ratio(rps["int8"], rps["service"]),
        "int8_vs_fp32_cpu": _ratio(eff["int8"], eff["service"]),
        "service_errors": service.load.failures if service else None,
        "service_failure_reasons": service.load.failure_reasons if service else {},
        "service_cpu_pct": service.server_cpu_pct if service else math.nan,
        "baseline_cpu_pct": steps["baseline"].server_cpu_pct if steps["baseline"] else math.nan,
        "cold_start_s": result.cold_start_s.get("service", math.nan),
        "cold_start_cpu_s": result.cold_start_cpu_s.get("service", math.nan),
        "profile": result.profile,
        "not_measured": result.not_measured,
    }


def _judge_ratio(wall: float, per_cpu: float, target: float) -> bool | None:
    """Met only when both the req/s ratio and the per-CPU-second ratio reach the target: when
    other processes share the cores, req/s alone rewards whichever server got more CPU."""
    if math.isnan(wall):
        return None
    return wall >= target and (math.isnan(per_cpu) or per_cpu >= target)


def verdicts(s: dict) -> list[tuple[str, bool | None, str]]:
    """(goal, met?, why) for each goal; None = not measured."""
    out = []
    ratio, per_cpu = s["service_vs_baseline"], s["service_vs_baseline_cpu"]
    why = (f"{_fmt(ratio, 2)}x on req/s ({_fmt(s['rps']['service'])} vs "
           f"{_fmt(s['rps']['baseline'])}), {_fmt(per_cpu, 2)}x per server CPU-second "
           f"({_fmt(s['req_per_cpu_s']['service'])} vs {_fmt(s['req_per_cpu_s']['baseline'])}); "
           f"the servers got {_fmt(s['service_cpu_pct'], 0)}% and "
           f"{_fmt(s['baseline_cpu_pct'], 0)}% of their core")
    if not math.isnan(s["runtime_fp32_vs_torch"]):
        why += (f". The runtimes alone, per CPU-second: ONNX Runtime fp32 "
                f"{_fmt(s['runtime_fp32_vs_torch'], 2)}x and int8 "
                f"{_fmt(s['runtime_int8_vs_torch'], 2)}x PyTorch eager (the most any fp32 or "
                f"int8 service can gain over this baseline per CPU-second); the int8 service "
                f"reached {_fmt(s['int8_vs_baseline'], 2)}x on req/s")
    goal = s["goal_vs_baseline"]
    out.append((f"service >= {goal:g}x baseline at {s['users']} users",
                _judge_ratio(ratio, per_cpu, goal), why))

    errors = s["service_errors"]
    reasons = "; ".join(f"{n}x {r}" for r, n in list(s["service_failure_reasons"].items())[:3])
    why = f"{errors} errors" + (f": {reasons}" if reasons else "")
    shed = sum(n for r, n in s["service_failure_reasons"].items() if "HTTP 503" in r)
    if errors and shed == errors and s["rps"]["service"] > 0:
        why = (f"{errors} of the answers were 503 'overloaded': the service shedding load by "
               f"design. {s['users']} closed-loop users at {_fmt(s['rps']['service'])} req/s "
               f"wait about {s['users'] / s['rps']['service']:.2f} s each (Little's law), close "
               "to or over the queueing budget CLASSIFIER_MAX_LATENCY_MS; the server got "
               f"{_fmt(s['service_cpu_pct'], 0)}% of its core")
    out.append((f"zero errors at {s['users']} users", None if errors is None else errors == 0,
                why))

    ratio, per_cpu = s["service_vs_ceiling"], s["service_vs_ceiling_cpu"]
    why = (f"{_fmt(ratio, 2)} on req/s vs the {s['ceiling_name']} ceiling's "
           f"{_fmt(s['ceiling_fp32'], 0)} images/s "
           f"(batch {s['best_batch']}), {_fmt(per_cpu, 2)} per CPU-second "
           f"({_fmt(s['req_per_cpu_s']['service'])} vs {_fmt(s['ceiling_fp32_per_cpu_s'], 0)} "
           "images/CPU-s)")
    if not math.isnan(per_cpu) and per_cpu < GOAL_VS_CEILING:
        why += (f". Decode + preprocess costs {_fmt(s['decode_ms'])} CPU-ms/image, which "
                "alone caps a server that also infers on the same core at "
                f"{_fmt(s['ceiling_with_decode_per_cpu_s'], 0)} images/CPU-s "
                f"({_fmt(s['service_vs_ceiling_with_decode_cpu'], 2)} of that reached); the "
                "rest is serving overhead")
    if s["profile"]:
        why += ". py-spy on the service at this load (busy samples): " + ", ".join(
            f"{stage} {share:.0f}%" for stage, share in s["profile"].items())
    out.append((f"service >= {GOAL_VS_CEILING:g} x in-process ceiling",
                _judge_ratio(ratio, per_cpu, GOAL_VS_CEILING), why))

    cold = s["cold_start_s"]
    out.append((f"cold start <= {GOAL_COLD_START_S:g} s (bentoml serve -> /readyz 200)",
                None if math.isnan(cold) else cold <= GOAL_COLD_START_S,
                (f"{_fmt(cold)} s wall, {_fmt(s['cold_start_cpu_s'])} CPU-s in the server's "
                 "processes (3 Python processes each importing BentoML; the model loads in "
                 "one)")))
    return out


def markdown(result: BenchResult, s: dict, command: str) -> str:
    lines = [(f"Run {result.started} on {result.machine}. Cores: {result.cpu_split}; "
             f"{result.threads} intra-op thread(s) for ONNX Runtime and torch."),
             f"Command: `{command}`", "",
             ("| server | users | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch "
              "| server CPU % | req per server CPU-s | Locust CPU % | server RSS MB |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for step in result.steps:
        load = step.load
        lines.append(f"| {variant_title(step.variant)} | {step.users} | {_fmt(load.rps)} | "
                     f"{_fmt(load.p50_ms, 0)} | {_fmt(load.p95_ms, 0)} | {_fmt(load.p99_ms, 0)} | "
                     f"{load.failures} | {_fmt(step.mean_batch)} | {_fmt(step.server_cpu_pct, 0)}"
                     f" | {_fmt(step.req_per_cpu_s)} | {_fmt(load.loadgen_cpu_pct, 0)} | "
                     f"{_fmt(step.rss_mb, 0)} |")
    first = next(iter(result.ceiling.values()), [])
    lines += ["", "| in-process ceiling (preprocessed tensors, no HTTP) | "
              + " | ".join(f"batch {p['batch_size']}" for p in first)
              + " |", "|---|" + "---|" * len(first)]
    columns = [p["batch_size"] for p in first]
    for name, points in result.ceiling.items():
        by_batch = {p["batch_size"]: p for p in points}
        for key, unit in (("images_per_s", "images/s"), ("images_per_cpu_s", "images per CPU-s")):
            lines.append(f"| {name} {unit} | " + " | ".join(
                _fmt(by_batch[b][key], 0) if b in by_batch else "" for b in columns) + " |")
    lines += ["", "Decode + preprocess (bytes -> tensor, `load_and_preprocess`), CPU ms/image: "
              + ", ".join(f"{k} {_fmt(v)}" for k, v in result.decode_ms.items()) + ".",
              "Cold start (server start -> first /readyz 200): "
              + ", ".join(f"{k} {_fmt(v)} s ({_fmt(result.cold_start_cpu_s.get(k))} CPU-s)"
                          for k, v in result.cold_start_s.items()) + ".", "",
              (f"Ratios at {s['users']} users, req/s (per server CPU-second in brackets): "
              f"service / ceiling {_fmt(s['service_vs_ceiling'], 2)} "
              f"({_fmt(s['service_vs_ceiling_cpu'], 2)}; / ceiling with decode "
              f"{_fmt(s['service_vs_ceiling_with_decode_cpu'], 2)}), batching on / off "
              f"{_fmt(s['batching_on_vs_off'], 2)} ({_fmt(s['batching_on_vs_off_cpu'], 2)}), "
              f"service / baseline {_fmt(s['service_vs_baseline'], 2)} "
              f"({_fmt(s['service_vs_baseline_cpu'], 2)}), int8 / fp32 "
              f"{_fmt(s['int8_vs_fp32'], 2)} ({_fmt(s['int8_vs_fp32_cpu'], 2)})."), ""]
    lines += runtime_lines(result, s["users"])
    if result.served:
        lines.append("Served (from /model): " + ", ".join(
            f"{variant} -> {what}" for variant, what in result.served.items()) + ".")
    for variant, why in result.not_measured.items():
        title = variant if variant.startswith("ceiling ") else variant_title(variant)
        lines.append(f"- {title}: not measured, {why}")
    for goal, met, why in verdicts(s):
        mark = "not measured" if met is None else ("met" if met else "MISSED")
        lines.append(f"- {goal}: **{mark}**, {why}")
    return "\n".join(lines) + "\n"


def runtime_lines(result: BenchResult, users: int) -> list[str]:
    """Per runtime + precision: its ceiling and its service at `users`, side by side."""
    names = [n for n in result.ceiling if n != "torch eager"]
    if not names:
        return []
    lines = [(f"| runtime + precision | ceiling images/s (batch) | ceiling images per CPU-s "
              f"| service req/s at {users} users | service req per CPU-s | service / ceiling |"),
             "|---|---|---|---|---|---|"]
    for name in names:
        best, batch = best_ceiling(result, name)
        step = _step(result, CEILING_ALIASES.get(name, name), users) or _step(result, name, users)
        rps = step.load.rps if step else math.nan
        lines.append(f"| {name} | {_fmt(best, 0)} ({batch}) | "
                     f"{_fmt(best_ceiling_cpu(result, name), 0)} | {_fmt(rps)} | "
                     f"{_fmt(step.req_per_cpu_s if step else math.nan)} | "
                     f"{_fmt(_ratio(rps, best), 2)} |")
    return [*lines, ""]


def render(result: BenchResult, out: Path, users: int, console: Console,
           command: str = "make bench-serve") -> dict:
    """Print the table and verdicts for `users`; write OUT/bench_serve.md and .json."""
    s = summary(result, users)
    table = Table(title="bench-serve (closed-loop users, /classify, one photo per request)")
    for column in ("server", "users", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors",
                   "mean batch", "server CPU %", "req/CPU-s", "Locust CPU %", "RSS MB"):
        table.add_column(column, justify="left" if column == "server" else "right")
    for step in result.steps:
        load = step.load
        table.add_row(variant_title(step.variant, short=True), str(step.users), _fmt(load.rps),
                      _fmt(load.p50_ms, 0), _fmt(load.p95_ms, 0), _fmt(load.p99_ms, 0),
                      str(load.failures), _fmt(step.mean_batch), _fmt(step.server_cpu_pct, 0),
                      _fmt(step.req_per_cpu_s), _fmt(load.loadgen_cpu_pct, 0),
                      _fmt(step.rss_mb, 0))
    console.print(table)
    text = markdown(result, s, command)
    console.print(text.split("\n\n", 2)[-1])
    (out / "bench_serve.md").write_text(text)
    save(result, out)
    console.print(f"[dim]written: {out}/bench_serve.md, bench_serve.json, Locust "
                  "CSV/HTML per step[/]")
    return s


def splits_markdown(results: dict[str, BenchResult], users: int) -> str:
    """The key figures and the goals, one column per core split."""
    summaries = {split: summary(result, users) for split, result in results.items()}

    def row(name: str, cell) -> str:
        return f"| {name} | " + " | ".join(cell(s) for s in summaries.values()) + " |"

    def mark(met: bool | None) -> str:
        return "not measured" if met is None else ("met" if met else "**missed**")

    judged = {split: verdicts(s) for split, s in summaries.items()}
    lines = [f"Goals at {users} users, by how the cores were split:", "",
             "| | " + " | ".join(f"cores {split}" for split in results) + " |",
             "|---|" + "---|" * len(results),
             row("service fp32 req/s", lambda s: _fmt(s["rps"]["service"])),
             row("service int8 req/s", lambda s: _fmt(s["rps"]["int8"])),
             row("baseline req/s", lambda s: _fmt(s["rps"]["baseline"])),
             row("in-process ceiling fp32 images/s",
                 lambda s: f"{_fmt(s['ceiling_fp32'], 0)} (batch {s['best_batch']})"),
             row("service / baseline (int8 service / baseline)",
                 lambda s: f"{_times(s['service_vs_baseline'])} "
                           f"({_times(s['int8_vs_baseline'])})"),
             row("service / ceiling", lambda s: _fmt(s["service_vs_ceiling"], 2)),
             row("batching on / off", lambda s: _fmt(s["batching_on_vs_off"], 2))]
    for index in range(len(next(iter(judged.values())))):
        # The baseline goal differs by split (3x pinned, 5x shared): name each split's.
        goals = list(dict.fromkeys(verdict[index][0] for verdict in judged.values()))
        goal = goals[0] if len(goals) == 1 else " / ".join(
            f"{text} ({split})" for split, text in zip(judged, goals, strict=False))
        lines.append(f"| {goal} | " + " | ".join(
            mark(verdict[index][1]) for verdict in judged.values()) + " |")
    lines.append("")
    for result in results.values():
        lines.append(f"- {result.cpu_split}; {result.threads} intra-op thread(s).")
    return "\n".join(lines) + "\n"


def render_splits(results: dict[str, BenchResult], out: Path, users: int,
                  console: Console) -> str:
    """Print and write (OUT/bench_serve.md) the goals for every core split side by side."""
    text = splits_markdown(results, users)
    console.rule("bench-serve: both core splits")
    console.print(text)
    (out / "bench_serve.md").write_text(text + "".join(
        f"\n## Cores {split}\n\n" + (out / split / "bench_serve.md").read_text()
        for split in results))
    console.print(f"[dim]written: {out}/bench_serve.md (every split), "
                  f"{out}/<split>/ (each split's JSON, logs, Locust reports)[/]")
    return text


def main() -> None:
    """`python -m benchmarks.report bench_out/serve/pinned/bench_serve.json`: print it again."""
    import sys

    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench_out/serve/pinned/bench_serve.json")
    result = load_result(path)
    users = max(step.users for step in result.steps)
    print(markdown(result, summary(result, users), "make bench-serve"))


if __name__ == "__main__":
    main()
