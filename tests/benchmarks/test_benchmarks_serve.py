"""bench-serve and soak end to end in miniature: real servers, real Locust, short steps.

The figures are not judged here (the machine is shared and tests carry no wall-clock bounds);
what is checked is that every variant is measured side by side with zero errors, that the
table, ratios, verdicts and files come out, and that the soak samples memory and latency.
"""

from __future__ import annotations

import json
import math

import httpx

from benchmarks.ab_serve import AbServeConfig, Variant, run_ab
from benchmarks.bench_serve import BenchServeConfig, run_bench
from benchmarks.report import summary
from benchmarks.soak import SoakConfig, run_soak
from loadtests.prom import scrape
from tests.conftest import DEMO_CATALOG


def test_bench_serve_measures_service_and_baseline_side_by_side(tiny_onnx_model, tiny_run,
                                                                  tmp_path):
    config = BenchServeConfig(
        run=tiny_run, model=tiny_onnx_model, users=[2], duration_s=3, warmup_s=0,
        photos_per_label=1,
        variants=["service", "onnxruntime-fp32", "baseline"], ceiling_batch_sizes=[1, 4],
        ceiling_variants=["onnxruntime-fp32", "openvino-fp32", "openvino-int8"],
        ceiling_seconds=0.3, out=tmp_path, profile=False)
    result = run_bench(config, "shared")
    out = tmp_path / "shared"

    assert [(s.variant, s.users) for s in result.steps] == [
        ("service", 2), ("onnxruntime-fp32", 2), ("baseline", 2)]
    for step in result.steps:
        assert step.load.requests > 0 and step.load.failures == 0, step.load.failure_reasons
        assert step.rss_mb > 0 and step.server_cpu_pct > 0
    service = result.steps[0]
    assert service.batches > 0 and service.mean_batch >= 1.0
    assert set(result.cold_start_s) == {"service", "onnxruntime-fp32", "baseline"}
    # Every runtime's ceiling; the tiny model has no int8 file, and the report says so.
    assert set(result.ceiling) == {"onnxruntime-fp32", "openvino-fp32", "torch eager"}
    for name in ("onnxruntime-fp32", "openvino-fp32"):
        assert [p["batch_size"] for p in result.ceiling[name]] == [1, 4]
        assert all(p["images_per_s"] > 0 for p in result.ceiling[name])
    assert "int8" in result.not_measured["ceiling openvino-int8"]
    # The default service runs what auto picks (OpenVINO on x86-64 with it installed).
    assert result.served["onnxruntime-fp32"] == "onnxruntime-fp32"
    assert result.served["service"].endswith("-fp32")  # no gate in the tiny model: fp32
    assert set(result.decode_ms) == {"thumb", "original", "large", "mix"}
    assert result.decode_ms["large"] > result.decode_ms["thumb"]  # same photos, 5x the pixels

    figures = summary(result, 2)
    assert figures["service_vs_baseline"] > 0 and figures["service_vs_baseline_cpu"] > 0
    assert math.isnan(figures["batching_on_vs_off"])  # not asked for, not made up
    markdown = (out / "bench_serve.md").read_text()
    assert "| service default runtime, batching on | 2 |" in markdown
    assert "| service onnxruntime-fp32, batching on | 2 |" in markdown
    assert "| openvino-fp32 |" in markdown and "| onnxruntime-fp32 |" in markdown
    assert "| baseline FastAPI + torch eager | 2 |" in markdown
    assert "zero errors at 2 users: **met**" in markdown
    assert "int8 / fp32 n/a" in markdown  # int8 not measured here, and the report says so
    saved = json.loads((out / "bench_serve.json").read_text())
    assert len(saved["steps"]) == 3
    assert (out / "service_u2.html").is_file()


def test_soak_reports_memory_and_latency_over_time(tiny_service, tmp_path):
    config = SoakConfig(host=tiny_service.url, duration_s=8, warmup_s=1, users=2,
                        think_time_s=0.05, sample_every_s=0.5, out=tmp_path, cpu_split="shared",
                        photos_per_label=1)
    report = run_soak(config)
    assert report.requests > 0 and report.failures == 0
    assert report.samples >= 5
    assert report.rss_first_mb > 0 and report.rss_last_mb > 0
    assert {"supervisor", "api", "model"} <= set(report.rss_growth_by_role_mb)  # BentoML's 3
    assert not math.isnan(report.p95_first_ms) and not math.isnan(report.p95_last_ms)
    assert json.loads((tmp_path / "soak.json").read_text())["requests"] == report.requests
    assert (tmp_path / "soak.png").stat().st_size > 0
    assert (tmp_path / "soak_samples.csv").read_text().count("\n") == report.samples + 1


def test_ab_serve_serves_each_variant_and_reports_cpu_by_process(tiny_onnx_model, tiny_service,
                                                                 tmp_path):
    variants = run_ab(AbServeConfig(
        variants=["default", "nobatch:CLASSIFIER_BATCHING=false+CLASSIFIER_TOP_K=2"],
        model=tiny_onnx_model, rounds=1, users=2, duration_s=2, warmup_s=0, cpu_split="shared",
        out=tmp_path))
    assert [v.name for v in variants] == ["default", "nobatch"]
    assert variants[1].settings == {"CLASSIFIER_BATCHING": "false", "CLASSIFIER_TOP_K": "2"}
    for variant in variants:
        (figures,) = variant.rounds
        assert figures["rps"] > 0 and figures["errors"] == 0
        assert figures["api_ms"] > 0 and figures["model_ms"] > 0  # both BentoML processes found
    assert Variant.parse("before@bb06f86").rev == "bb06f86"

    # A service running meanwhile must still count its requests: `bentoml serve` empties its
    # home's Prometheus folder when it starts, so each server of ours gets a home of its own.
    def batches() -> float:
        return scrape(tiny_service.url).get("classifier_model_batch_images_count", 0.0)

    counted = batches()
    photo = min((DEMO_CATALOG / "hat").iterdir()).read_bytes()
    assert httpx.post(f"{tiny_service.url}/classify", files={"image": ("hat.jpg", photo)},
                      timeout=30).status_code == 200
    assert batches() == counted + 1
