"""Several heads on one backbone: the main label's head plus one linear head per attribute
(colour, pattern, ...), and the masked loss they train with.

`MultiHead(base, heads)` runs the backbone once and returns (logits, attr_1, attr_2, ...):
the shape `trainer export` writes as one ONNX file with one output per head. A photo whose
value of an attribute is unknown has target -1 there and adds nothing to that head's loss.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.contract import ATTRIBUTE_OUTPUT
from trainer.data import loss_weights
from trainer.models import Classifier

UNKNOWN_TARGET = -1


def attribute_output(name: str) -> str:
    """The ONNX output name of an attribute's head."""
    return ATTRIBUTE_OUTPUT.format(name)


def new_head(in_features: int, values: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, values))


def in_features(model: Classifier) -> int:
    return model.head[-1].in_features


class MultiHead(nn.Module):
    """The trained Classifier (backbone + main head) with attribute heads beside its head."""

    def __init__(self, base: Classifier, heads: dict[str, nn.Module]):
        super().__init__()
        self.base = base
        self.names = list(heads)
        self.heads = nn.ModuleDict(heads)

    @property
    def output_names(self) -> list[str]:
        """The ONNX outputs, in forward's order (the contract's `outputs()`)."""
        return ["logits", *(attribute_output(name) for name in self.names)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.base.features(x)
        return (self.base.head(feats), *(self.heads[name](feats) for name in self.names))


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         weight: torch.Tensor | None = None,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the photos whose value is known (target >= 0); 0 (with a gradient
    path) for a batch with none, so a batch of unknowns is no error and no signal."""
    known = targets >= 0
    if not bool(known.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known], targets[known], weight=weight,
                           label_smoothing=label_smoothing)


def value_weights(targets: np.ndarray, values: int, balance: str) -> torch.Tensor | None:
    """Per-value loss weights over the known targets, by the main label's rule
    (trainer.data.loss_weights)."""
    return loss_weights(np.bincount(targets[targets >= 0], minlength=values), balance)
