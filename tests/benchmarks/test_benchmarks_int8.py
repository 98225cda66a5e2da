"""bench_int8 on a real (head-only Lite0) run: the three files it writes are what it says (fp32,
8-bit and 7-bit int8 weights), every figure is measured on the photos asked for, and the
"exact" reference really is the quantized graph computed in float."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.bench_int8 import BenchInt8, exact_session, run_bench
from tests.conftest import DEMO_CATALOG
from trainer.onnx_graph import onnx_logits, session


def test_bench_int8_scores_fp32_and_both_int8_files_on_the_same_photos(tiny_run, tmp_path):
    photos = tmp_path / "photos"
    for folder in sorted(p for p in DEMO_CATALOG.iterdir() if p.is_dir())[:3]:
        (photos / folder.name).mkdir(parents=True)
        for photo in sorted(folder.glob("*.jpg"))[:4]:
            (photos / folder.name / photo.name).symlink_to(photo)
    out = tmp_path / "bench"
    report = run_bench(BenchInt8(run_dir=tiny_run, data=photos, out=out, rounds=1,
                                 calibration_images=8))
    assert report["images"] == 12 and report == json.loads((out / "int8.json").read_text())
    files = report["files"]
    assert set(files) == {"fp32", "int8 8-bit", "int8 7-bit"}
    assert files["fp32"]["top1_agreement_with_fp32"] == 1.0
    assert files["fp32"]["max_abs_logit_diff"] == 0.0
    for name, figures in files.items():
        assert 0 <= figures["accuracy"] <= 1 and figures["images_per_s_batch16"] > 0, name
        assert round(figures["accuracy"] * 12, 6).is_integer()
    # The two int8 files differ: the 7-bit one has half the weight resolution.
    assert (out / "model.int8.onnx").read_bytes() != (out / "model.int8-7bit.onnx").read_bytes()
    for name in ("int8 8-bit", "int8 7-bit"):
        assert {"exact_top1_agreement_with_fp32", "top1_agreement_with_exact",
                "max_abs_logit_diff_vs_exact"} <= set(files[name])
    # Exact = the graph's own arithmetic: on the fp32 file it is the optimized session's result;
    # on an int8 file it is neither fp32's nor the int8 kernels' (it holds the weights' rounding,
    # not the kernels' own).
    reference = session(out / "model.onnx")
    size = reference.get_inputs()[0].shape[2:]
    images = np.random.default_rng(0).normal(size=(4, 3, *size)).astype(np.float32)
    fp32 = onnx_logits(reference, images)
    assert np.abs(onnx_logits(exact_session(out / "model.onnx", 2), images) - fp32).max() < 1e-4
    exact = onnx_logits(exact_session(out / "model.int8.onnx", 2), images)
    assert np.abs(exact - fp32).max() > 1e-4
    assert not np.array_equal(exact, onnx_logits(session(out / "model.int8.onnx"), images))
