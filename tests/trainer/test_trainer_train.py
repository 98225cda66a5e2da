"""Training lowers the loss, checkpoints are written, and --resume survives a kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.config import TrainConfig, TrainerError
from trainer.data import EvalImages, Skipped, discover
from trainer.models import build_model
from trainer.runs import RunDir, load_checkpoint, load_trained
from trainer.train import make_contract

REPO = Path(__file__).resolve().parents[2]


def cli_args(**knobs) -> list[str]:
    args = []
    for key, value in knobs.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_training_lowers_the_loss(tiny_run, tiny_folder):
    config = TrainConfig.model_validate_json((tiny_run / "config.json").read_text())
    splits = discover(tiny_folder)
    contract = make_contract(config, splits.labels)
    images = EvalImages(splits.train, contract, Skipped())
    torch.manual_seed(config.seed)  # the same head initialisation the run started from
    before = build_model(config.arch, len(splits.labels)).eval()
    after, _, _ = load_trained(tiny_run, which="last")
    with torch.no_grad():
        loss_before = F.cross_entropy(before(images.tensor), images.labels).item()
        loss_after = F.cross_entropy(after(images.tensor), images.labels).item()
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)


def test_run_folder_holds_everything(tiny_run):
    run = RunDir(tiny_run)
    for path in (run.config, run.dataset, run.history, run.last, run.best):
        assert path.is_file(), path
    history = json.loads(run.history.read_text())
    assert [row["phase"] for row in history] == ["head", "finetune", "finetune"]
    assert all(0 <= row["val_acc"] <= 1 and row["val_loss"] > 0 for row in history)
    best = load_checkpoint(run.best)
    assert best["metrics"]["val_macro_f1"] == max(r["val_macro_f1"] for r in history)
    assert not list(tiny_run.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_training_again_into_a_used_run_folder_needs_resume(tiny_run, tiny_folder):
    from trainer.train import train

    with pytest.raises(TrainerError, match="--resume"):
        train(TrainConfig(data=tiny_folder, out=tiny_run))


def test_resume_continues_after_kill_9(tiny_folder, tiny_train, tmp_path):
    out = tmp_path / "killed"
    # With the weight average on: a resume must restore it too, not restart it from the model.
    knobs = dict(tiny_train, epochs=3, max_steps_per_epoch=3, ema_horizon=0.5)
    command = [sys.executable, "-m", "trainer", "train", "--data", str(tiny_folder),
               "--out", str(out), *cli_args(**knobs)]
    env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="68719476736")
    victim = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    history = out / "history.json"
    deadline = time.monotonic() + 300
    rows = []
    while time.monotonic() < deadline and victim.poll() is None:
        if history.is_file():
            rows = json.loads(history.read_text())
            if any(row["epoch"] == 1 for row in rows):
                break
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed: " + (
        victim.stderr.read().decode()[-2000:])
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    done_before_kill = load_checkpoint(out / "checkpoints" / "last.pt")["state"]
    assert 1 <= done_before_kill["epoch"] < 3

    resumed = subprocess.run([sys.executable, "-m", "trainer", "train", "--out", str(out),
                              "--resume"], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=580)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{done_before_kill['epoch']} of 3 fine-tuning epochs done" in resumed.stdout
    final = json.loads(history.read_text())
    assert [row["epoch"] for row in final] == [0, 1, 2, 3]  # each epoch exactly once
    assert final[:len(rows)] == rows                           # earlier epochs kept as they were
    assert (out / "report" / "MODEL_CARD.md").is_file()        # `train` evaluates at the end
    from trainer.train import train

    train(TrainConfig(data=tiny_folder, out=tmp_path / "whole", **knobs))
    whole, resumed_last = (load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt"),
                           load_checkpoint(out / "checkpoints" / "last.pt"))
    for part in ("model", "ema"):  # the same weights as a run that was never killed
        differ = [k for k, v in whole[part].items()
                  if not torch.allclose(resumed_last[part][k].float(), v.float(), atol=1e-5)]
        assert not differ, (part, differ[:5])


def test_cli_explains_a_missing_data_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trainer", "train", "--data",
                             str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")],
                            check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"data folder {tmp_path / 'nowhere'} does not exist" in result.stderr


def test_resuming_a_run_started_with_the_renamed_ema_decay_is_refused_clearly(tiny_run, tmp_path):
    from trainer.config import load_config

    saved = json.loads((tiny_run / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(saved | {"ema_decay": 0.995}))
    with pytest.raises(TrainerError, match="--ema-decay 0.995, which this version replaced by "
                                           "--ema-horizon"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(saved | {"ema_decay": 0.0}))
    assert load_config(tmp_path).ema_horizon == 0  # off then, off now: nothing is lost
