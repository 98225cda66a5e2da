"""A tampered checkpoint is refused before any of its code runs (evaluate, export, resume)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import TrainConfig, save_config
from trainer.runs import RunDir, UnsafeCheckpointError, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="68719476736")


class Planted:
    """Unpickling this runs a shell command: what a malicious .pt file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Planted(marker), "contract": {"version": "x", "labels": ["a", "b"]},
                "state": {}}, path)


def trainer_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300, check=False)


def test_the_planted_file_really_runs_code_when_unpickled(tmp_path):
    # The control: without weights_only the same file does run its command.
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    plant(path, marker)
    subprocess.run([sys.executable, "-c",
                    "import sys, torch; torch.load(sys.argv[1], weights_only=False)", str(path)],
                   check=True, timeout=120, env=ENV)
    assert marker.exists()


def test_evaluate_refuses_a_malicious_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    marker = tmp_path / "pwned"
    plant(run.best, marker)
    result = trainer_cli("evaluate", str(run.root))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "refusing to load" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="could run code"):
        load_checkpoint(run.best)
    assert not marker.exists()


def test_resume_refuses_a_malicious_checkpoint(tiny_folder, tiny_train, tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    save_config(TrainConfig(data=tiny_folder, out=run.root, **tiny_train), run.root)
    marker = tmp_path / "pwned"
    plant(run.last, marker)
    result = trainer_cli("train", "--out", str(run.root), "--resume")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"refusing to load {run.last}" in result.stderr.replace("\n", "")
    assert not marker.exists()
