"""torchrun with 2 CPU processes (gloo) trains what 1 process trains, into the same run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.models import build_model
from trainer.runs import RunDir, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="68719476736")
# Deterministic apart from summation order: no augmentation draws, no dropout; 4 steps of a
# global batch of 8 (4 photos per process with 2).
KNOBS = ["--image-size", "64", "--batch-size", "8", "--head-epochs", "5", "--steps", "4",
         "--evaluations", "2", "--selection", "val", "--augment", "none", "--dropout", "0",
         "--threads", "1", "--eval-batch-size", "32",
         "--lr", "0.003", "--backbone-lr-ratio", "1"]  # steps big enough to compare


def trainer_train(launcher: list[str], data: Path, out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([*launcher, "-m", "trainer", "train", "--data", str(data), "--out",
                             str(out), *KNOBS], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=500, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one_and_two(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    trainer_train([sys.executable], tiny_folder, root / "one")
    two = trainer_train([sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc-per-node", "2"], tiny_folder, root / "two")
    return RunDir(root / "one"), RunDir(root / "two"), two


def test_two_processes_train_what_one_process_trains(one_and_two):
    one, two, _ = one_and_two
    a, b = load_checkpoint(one.last)["model"], load_checkpoint(two.last)["model"]
    assert a.keys() == b.keys()
    pretrained = build_model("tf_efficientnet_lite0", 4).state_dict()
    keys = [k for k in a if a[k].is_floating_point() and not k.startswith("head")]
    moved_one = torch.cat([(a[k] - pretrained[k]).flatten() for k in keys])
    moved_two = torch.cat([(b[k] - pretrained[k]).flatten() for k in keys])
    # What fine-tuning changed in the backbone, compared: equal up to summation order.
    assert moved_one.abs().max() > 1e-3
    assert float((moved_two - moved_one).norm() / moved_one.norm()) < 0.02
    history_one = json.loads(one.history.read_text())
    history_two = json.loads(two.history.read_text())
    assert [r["phase"] for r in history_two] == [r["phase"] for r in history_one]
    for r1, r2 in zip(history_one, history_two):
        assert r2["val_loss"] == pytest.approx(r1["val_loss"], abs=2e-3)
        assert r2["val_acc"] == r1["val_acc"]


def test_the_run_folder_is_the_same_with_two_processes(one_and_two):
    one, two, result = one_and_two
    for run in (one, two):
        for path in (run.config, run.dataset, run.history, run.last, run.best, run.selection,
                     run.report / "MODEL_CARD.md"):
            assert path.is_file(), path
    assert "(2 processes)" in result.stdout
    assert not list(two.root.rglob("*.tmp"))
    cfg_one = json.loads(one.config.read_text())
    cfg_two = json.loads(two.config.read_text())
    assert {k: v for k, v in cfg_one.items() if k != "out"} == \
        {k: v for k, v in cfg_two.items() if k != "out"}
