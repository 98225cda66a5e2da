"""The run folder: where each file lives, atomic writes, and loading the trained model back.

RUN_DIR/
  config.json            every knob of the run (TrainConfig)
  dataset.json           labels, counts per split, where validation came from, skipped files
  history.json           one row per epoch: loss, accuracy, macro-F1, LR, images/s, wall time
  checkpoints/last.pt    everything --resume needs (model, optimizer, schedule, RNG, history)
  selection.json         how the exported model was chosen (cross-validation folds) + calibration
  checkpoints/best.pt    the model to export, with its contract (temperature included)
  checkpoints/head.pt    the head phase's weights, with --wise-alpha (WiSE-FT averages them)
  report/                written by `trainer evaluate` (metrics, plots, MODEL_CARD.md)
  export/                written by `trainer export` (model.onnx, model.int8.onnx, export.json),
                         built in export.partial-PID-*/ and renamed into place when complete
"""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from service.contract import ModelContract
from trainer.config import TrainerError


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset.json"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best.pt"

    @property
    def head(self) -> Path:
        return self.root / "checkpoints" / "head.pt"

    @property
    def selection(self) -> Path:
        return self.root / "selection.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def export(self) -> Path:
        return self.root / "export"


def atomic_write_bytes(path: Path, write) -> None:
    """write(file) into a temporary sibling, fsync, then rename: a kill -9 at any moment
    leaves either the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write_bytes(path, lambda handle: torch.save(obj, handle))


def atomic_write_json(path: Path, obj) -> None:
    data = json.dumps(obj, indent=2, default=str).encode()
    atomic_write_bytes(path, lambda handle: handle.write(data))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def staging_dir(final: Path) -> Path:
    """A new empty folder beside `final` (same file system, so `publish_dir` can rename it into
    place) named FINAL.partial-PID-RANDOM. Staging folders of processes that no longer run (a
    kill -9 mid-write) and folders a publish left behind are removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"{re.escape(final.name)}\.(partial|old)-(\d+)-[0-9a-f]+")
    for stale in final.parent.iterdir():
        match = pattern.fullmatch(stale.name)
        if match and stale.is_dir() and (match[1] == "old" or not _alive(int(match[2]))):
            shutil.rmtree(stale, ignore_errors=True)
    staged = final.with_name(f"{final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    staged.mkdir()
    return staged


def publish_dir(staged: Path, final: Path) -> None:
    """Put the complete folder `staged` where `final` is, by renames only: at every moment
    `final` is the old complete folder, absent, or the new complete folder, never a mix or a
    torn file. Files are flushed to disk first, so a crash cannot publish empty files."""
    for path in staged.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(staged)
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync_dir(final.parent)


class UnsafeCheckpointError(TrainerError):
    """A checkpoint holds more than tensors and plain values: loading it could run code."""


def load_checkpoint(path: Path) -> dict:
    """torch.load with weights_only=True: tensors, numbers, strings, lists and dicts only.

    Checkpoints are written with plain types only (state dicts, model_dump() of the contract
    and config, history rows), so nothing needs allow-listing; a pickle that would construct
    any other object (the way a tampered file runs code) is refused before anything runs.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain values, "
            "which a checkpoint written by `trainer train` never does (loading it could run "
            f"code). Retrain, or restore the file from a trusted copy. Detail: "
            f"{str(exc).splitlines()[-1] if str(exc) else type(exc).__name__}") from None


def load_trained(run_dir: Path, which: str = "best"):
    """(model in eval mode, contract, checkpoint dict) from a run folder."""
    from trainer.models import build_model

    run = RunDir(Path(run_dir))
    path = run.best if which == "best" else run.last
    if not path.is_file():
        raise TrainerError(f"{path} does not exist: train first with "
                                f"`trainer train --data DIR --out {run_dir}`")
    checkpoint = load_checkpoint(path)
    contract = ModelContract.model_validate(checkpoint["contract"])
    model = build_model(contract.architecture, len(contract.labels), weights="none")
    model.load_state_dict(checkpoint["model"])
    return model.eval(), contract, checkpoint
