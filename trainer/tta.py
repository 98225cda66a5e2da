"""Flip test-time augmentation inside the ONNX graph, and what it buys: the logits of a photo
and of its mirror image, averaged, in one graph the service runs unchanged (same input, same
output), measured against the plain graph for accuracy and images/s."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.contract import ModelContract


class FlipAverage(nn.Module):
    """logits = (model(x) + model(flip_width(x))) / 2: twice the compute, one graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(torch.flip(x, dims=[3]))) / 2


def measure_flip_tta(model: nn.Module, contract: ModelContract, path: Path, images: np.ndarray,
                     labels: np.ndarray, plain_session, exporter: str, batch: int) -> dict:
    """Export the flip-averaged graph to path, check it against torch, and measure accuracy
    and speed beside the plain graph (interleaved: the machine's load changes)."""
    from trainer.onnx_graph import (
        export_onnx,
        images_per_second,
        onnx_logits,
        session,
        torch_logits,
    )

    tta = FlipAverage(model).eval()
    used = export_onnx(tta, contract, path, exporter)
    sess = session(path)
    ours, theirs = onnx_logits(sess, images), torch_logits(tta, images)
    plain = onnx_logits(plain_session, images)
    plain_rates, tta_rates = [], []
    for _ in range(3):
        plain_rates.append(images_per_second(plain_session, images, batch, repeats=3))
        tta_rates.append(images_per_second(sess, images, batch, repeats=3))
    acc_plain = float((plain.argmax(1) == labels).mean())
    acc_tta = float((ours.argmax(1) == labels).mean())
    plain_rate, tta_rate = statistics.median(plain_rates), statistics.median(tta_rates)
    return {"file": str(path), "exporter": used,
            "max_abs_logit_diff_vs_torch": float(np.abs(ours - theirs).max()),
            "val_acc": acc_tta, "val_acc_plain": acc_plain, "val_acc_gain": acc_tta - acc_plain,
            "images_per_s": round(tta_rate, 1), "images_per_s_plain": round(plain_rate, 1),
            "cost": round(plain_rate / tta_rate, 2), "batch": batch,
            # worth making the default only if it gains accuracy for its doubled cost
            "pays": acc_tta - acc_plain >= 0.005}
