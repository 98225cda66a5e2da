"""Where a served model comes from: the BentoML model store, or an .onnx path.

The trainer's export calls `save_to_store`; the service calls `resolve_model`. Both sides agree
on one layout: the store entry holds `model.onnx` (plus optional extras such as
`model.int8.onnx` and `MODEL_CARD.md`), and its metadata repeats the contract and metrics.
The ONNX file's own metadata stays the source of truth; the store copy must agree with it.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from service.contract import ContractError, ModelContract
from service.runtime import create_session

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # what `trainer export --int8` writes beside model.onnx
DEFAULT_MODEL_NAME = "product-classifier"


@dataclass(frozen=True)
class ResolvedModel:
    onnx_path: Path
    contract: ModelContract
    tag: str                               # BentoML tag, or the file path when not from the store
    metrics: dict = field(default_factory=dict)


def read_contract(onnx_path: Path) -> ModelContract:
    """The contract stored in an ONNX file's metadata_props, or a ContractError saying why not."""
    if not onnx_path.is_file():
        raise ContractError(f"model file {onnx_path} does not exist")
    try:
        session = create_session(onnx_path, optimize=False)  # metadata only: no optimisation
    except Exception as exc:
        raise ContractError(f"{onnx_path} is not a loadable ONNX model: {exc}") from exc
    contract = ModelContract.from_metadata(session.get_modelmeta().custom_metadata_map)
    outputs = session.get_outputs()
    classes = outputs[0].shape[-1] if outputs and outputs[0].shape else None
    if isinstance(classes, int) and classes != len(contract.labels):
        raise ContractError(f"{onnx_path} outputs {classes} classes but its metadata lists "
                            f"{len(contract.labels)} labels: {contract.labels}")
    return contract


def save_to_store(onnx_path: Path, *, name: str = DEFAULT_MODEL_NAME,
                  metrics: dict | None = None, extra_files: list[Path] | tuple = ()) -> str:
    """Copy an exported ONNX model (and extras) into the BentoML model store; returns the tag."""
    import bentoml  # imported here so reading a contract does not pay bentoml's import time

    contract = read_contract(onnx_path)
    metadata = {"contract": contract.model_dump(mode="json"), "metrics": metrics or {}}
    labels = {"version": contract.version, "architecture": contract.architecture or "unknown"}
    with bentoml.models.create(name, labels=labels, metadata=metadata,
                               module="product_classifier.onnx") as model_ref:
        target = Path(model_ref.path)
        shutil.copyfile(onnx_path, target / MODEL_FILE)
        for extra in extra_files:
            shutil.copyfile(extra, target / Path(extra).name)
    return str(model_ref.tag)


def resolve_model(ref: str) -> ResolvedModel:
    """A BentoML tag (`product-classifier:latest`) or a path to an .onnx file -> model + contract."""
    path = Path(ref)
    if ref.endswith(".onnx") or path.is_file():
        return ResolvedModel(path, read_contract(path), tag=str(path))
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model_ref = bentoml.models.get(ref)
    except NotFound as exc:
        raise ContractError(f"no model '{ref}' in the BentoML model store; train and export one "
                            "with `trainer export RUN_DIR`, or set the tag/path explicitly") from exc
    onnx_path = Path(model_ref.path) / MODEL_FILE
    contract = read_contract(onnx_path)
    stored = model_ref.info.metadata.get("contract")
    if stored is not None and ModelContract.model_validate(stored) != contract:
        raise ContractError(f"model '{model_ref.tag}': the store's metadata and {MODEL_FILE}'s "
                            "metadata disagree; re-export the model")
    return ResolvedModel(onnx_path, contract, tag=str(model_ref.tag),
                         metrics=dict(model_ref.info.metadata.get("metrics", {})))


def int8_variant(model: ResolvedModel) -> ResolvedModel:
    """The quantized file beside the fp32 one (store entry or export folder), same contract."""
    path = model.onnx_path.with_name(INT8_FILE)
    if not path.is_file():
        raise ContractError(f"CLASSIFIER_PRECISION=int8 but {path} does not exist; export with "
                            "`trainer export RUN_DIR --int8`")
    if read_contract(path) != model.contract:
        raise ContractError(f"{path} and {model.onnx_path} carry different contracts")
    return dataclasses.replace(model, onnx_path=path)
