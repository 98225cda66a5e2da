"""Where a served model comes from: the BentoML model store, or an .onnx path.

The trainer's export calls `save_to_store`; the service calls `resolve_model`. Both sides agree
on one layout: the store entry holds `model.onnx` (plus optional extras such as
`model.int8.onnx` and `MODEL_CARD.md`), and its metadata repeats the contract and metrics.
The ONNX file's own metadata stays the source of truth; the store copy must agree with it.
It also carries the export's accuracy gate (`GATE_KEY`): which runtime + precision variants
kept validation accuracy within `ACCURACY_BUDGET` of fp32, the main label's and every attribute
head's; `select_variant` serves only those.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from service.contract import ContractError, ModelContract
from service.runtime import (
    ONNXRUNTIME,
    OPENVINO,
    create_session,
    int8_products_saturate,
    openvino_supports,
    variant_name,
)

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # what `trainer export --int8` writes beside model.onnx
DEFAULT_MODEL_NAME = "product-classifier"
GATE_KEY = "product_classifier.accuracy_gate"  # JSON in model.onnx's metadata_props
FILES_KEY = "files"  # store entry metadata: {file name: sha256} of every file saved in it
# A variant may lose at most 0.3 points of validation accuracy against ONNX Runtime fp32.
ACCURACY_BUDGET = 0.003

logger = logging.getLogger("product_classifier.service")


@dataclass(frozen=True)
class ResolvedModel:
    onnx_path: Path
    contract: ModelContract
    tag: str                               # BentoML tag, or the file path when not from the store
    metrics: dict = field(default_factory=dict)
    gate: dict | None = None               # the export's accuracy gate; None: not checked


def read_contract(onnx_path: Path) -> ModelContract:
    """The contract stored in an ONNX file's metadata_props, or a ContractError saying why not."""
    return _read(onnx_path)[0]


def read_gate(onnx_path: Path) -> dict | None:
    """The accuracy gate `trainer export` wrote into the file, or None (not checked)."""
    return _read(onnx_path)[1]


def _read(onnx_path: Path) -> tuple[ModelContract, dict | None]:
    if not onnx_path.is_file():
        raise ContractError(f"model file {onnx_path} does not exist")
    try:
        session = create_session(onnx_path, optimize=False)  # metadata only: no optimisation
    except Exception as exc:
        raise ContractError(f"{onnx_path} is not a loadable ONNX model: {exc}") from exc
    metadata = session.get_modelmeta().custom_metadata_map
    contract = ModelContract.from_metadata(metadata)
    try:
        gate = json.loads(metadata[GATE_KEY]) if GATE_KEY in metadata else None
    except ValueError as exc:
        raise ContractError(f"{onnx_path}: metadata '{GATE_KEY}' is not JSON: {exc}") from None
    outputs = session.get_outputs()
    classes = outputs[0].shape[-1] if outputs and outputs[0].shape else None
    if isinstance(classes, int) and classes != len(contract.labels):
        raise ContractError(f"{onnx_path} outputs {classes} classes but its metadata lists "
                            f"{len(contract.labels)} labels: {contract.labels}")
    return contract, gate


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value if v is not None]
    return value


def save_to_store(onnx_path: Path, *, name: str = DEFAULT_MODEL_NAME,
                  metrics: dict | None = None, extra_files: list[Path] | tuple = ()) -> str:
    """Copy an exported ONNX model (and extras) into the BentoML model store; returns the tag.

    BentoML copies a new entry into the store file by file, so a kill -9 during that copy
    leaves a version folder with some files, or with a truncated one. Each file's sha256 goes
    into the entry's metadata: `resolve_model` refuses an entry that does not match it, and
    the next save of the same name removes such leftovers."""
    import bentoml  # imported here so reading a contract does not pay bentoml's import time

    contract, gate = _read(onnx_path)
    files = {MODEL_FILE: Path(onnx_path), **{Path(p).name: Path(p) for p in extra_files}}
    metadata = {"contract": contract.model_dump(mode="json"), "metrics": metrics or {},
                FILES_KEY: {file_name: file_sha256(p) for file_name, p in files.items()}}
    if gate is not None:  # repeated for `bentoml models get`; the file's copy is what counts
        metadata["accuracy_gate"] = gate
    metadata = _without_none(metadata)  # BentoML's metadata refuses None (unset = absent)
    labels = {"version": contract.version, "architecture": contract.architecture or "unknown"}
    with bentoml.models.create(name, labels=labels, metadata=metadata,
                               module="product_classifier.onnx") as model_ref:
        target = Path(model_ref.path)
        for file_name, path in files.items():
            shutil.copyfile(path, target / file_name)
    stored = bentoml.models.get(model_ref.tag)
    if problem := entry_problem(Path(stored.path), stored.info.metadata):
        raise ContractError(f"model '{stored.tag}' was not stored intact: {problem}")
    remove_interrupted_saves(Path(stored.path).parent)
    return str(model_ref.tag)


def entry_problem(entry: Path, metadata: dict) -> str | None:
    """What is missing or different in a store entry against the checksums saved with it."""
    for file_name, sha256 in (metadata.get(FILES_KEY) or {}).items():
        path = entry / file_name
        if not path.is_file():
            return f"{file_name} is missing"
        if file_sha256(path) != sha256:
            return f"{file_name} does not match the checksum recorded when it was saved"
    return None


def remove_interrupted_saves(name_dir: Path, min_age_s: float = 600) -> None:
    """Delete the version folders under `name_dir` that an interrupted save left: no
    model.yaml (BentoML writes it with the files), or files that differ from their checksums.
    Entries saved before checksums were recorded are kept as they are, and so is anything
    touched in the last `min_age_s` seconds: another export may be copying it right now."""
    import yaml

    now = time.time()
    for entry in sorted(p for p in name_dir.iterdir() if p.is_dir()):
        if now - max(p.stat().st_mtime for p in [entry, *entry.iterdir()]) < min_age_s:
            continue
        info = entry / "model.yaml"
        try:
            metadata = (yaml.safe_load(info.read_text()) or {}).get("metadata") or {}
            problem = entry_problem(entry, metadata) if info.is_file() else "no model.yaml"
        except (OSError, yaml.YAMLError) as exc:
            problem = f"model.yaml unreadable ({exc})"
        if problem:
            logger.warning("removing %s, left by an interrupted save: %s", entry, problem)
            shutil.rmtree(entry, ignore_errors=True)


def resolve_model(ref: str) -> ResolvedModel:
    """A BentoML tag (`product-classifier:latest`) or a path to an .onnx file -> model + contract."""
    path = Path(ref)
    if ref.endswith(".onnx") or path.is_file():
        contract, gate = _read(path)
        return ResolvedModel(path, contract, tag=str(path), gate=gate)
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        model_ref = bentoml.models.get(ref)
    except NotFound as exc:
        raise ContractError(f"no model '{ref}' in the BentoML model store; train and export one "
                            "with `trainer export RUN_DIR`, or set the tag/path explicitly") from exc
    except BentoMLException as exc:  # e.g. a version folder without model.yaml
        raise ContractError(f"model '{ref}' in the BentoML model store cannot be read ({exc}); "
                            "a save interrupted by a kill leaves such an entry: export again "
                            "with `trainer export RUN_DIR`, which removes it") from exc
    if problem := entry_problem(Path(model_ref.path), model_ref.info.metadata):
        raise ContractError(f"model '{model_ref.tag}' is incomplete: {problem} (a save "
                            "interrupted by a kill?); export again with `trainer export "
                            f"RUN_DIR`, which removes it, or `bentoml models delete "
                            f"{model_ref.tag}`")
    onnx_path = Path(model_ref.path) / MODEL_FILE
    contract, gate = _read(onnx_path)
    stored = model_ref.info.metadata.get("contract")
    if stored is not None and ModelContract.model_validate(stored) != contract:
        raise ContractError(f"model '{model_ref.tag}': the store's metadata and {MODEL_FILE}'s "
                            "metadata disagree; re-export the model")
    return ResolvedModel(onnx_path, contract, tag=str(model_ref.tag), gate=gate,
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


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def head_refusal(gate: dict, variant: str, attributes: Iterable[str] = ()) -> str | None:
    """Why the gate refuses `variant` for one of the model's attribute heads, or None.

    A head that lost more than the budget against ONNX Runtime fp32's accuracy for that head
    is refused; so is a variant of a model with attributes whose gate holds no figures for its
    heads (exported before every head was gated), except the reference, ONNX Runtime fp32,
    whose heads the export's parity check has always held equal to torch's."""
    entry = gate.get("variants", {}).get(variant) or {}
    budget = gate.get("budget", ACCURACY_BUDGET)
    checked = entry.get("heads") or {}
    for name, head in checked.items():
        reference = (gate.get("heads") or {}).get(name, {}).get("reference_val_acc")
        if head.get("val_acc") is None or reference is None:
            continue  # no validation photo with a known value: nothing was lost
        drop = reference - head["val_acc"]
        if drop > budget + 1e-9:
            return (f"{variant}'s attribute head {name!r} loses {100 * drop:.2f} points of "
                    f"validation accuracy against fp32 ({head['val_acc']:.4f} vs "
                    f"{reference:.4f} on {head.get('val_known')} photos with a known value; the "
                    f"budget is {100 * budget:.1f}); serve CLASSIFIER_PRECISION=fp32 or another "
                    "variant whose heads all passed")
    unchecked = sorted(set(attributes) - set(checked))
    if unchecked and variant != gate.get("reference"):
        return (f"the attribute heads {unchecked} were not checked on {variant} when the model "
                "was exported (a gate from before every head was checked); re-export with "
                "`trainer export RUN_DIR`, or serve CLASSIFIER_RUNTIME=onnxruntime "
                "CLASSIFIER_PRECISION=fp32")
    return None


def cpu_refusal(gate: dict, variant: str, saturates: bool | None = None) -> str | None:
    """Why the gate's figure for `variant` does not hold on this CPU, or None.

    ONNX Runtime's int8 kernels on an x86 CPU without VNNI can overflow with 8-bit weights
    (`int8_products_saturate`; `saturates` overrides the probe of this CPU): 8-bit weights
    checked on a CPU that has VNNI were not checked for this one. 7-bit weights, or a gate
    measured on a CPU without VNNI, hold here."""
    entry = gate.get("variants", {}).get(variant) or {}
    if entry.get("runtime") != ONNXRUNTIME or entry.get("precision") != "int8":
        return None
    if entry.get("weight_bits", 8) < 8 or gate.get("int8_products_saturate"):
        return None
    if not (int8_products_saturate() if saturates is None else saturates):
        return None
    return (f"{variant}'s 8-bit weights were checked on a CPU with VNNI; this one has none "
            "(x86, AVX2 only), where ONNX Runtime's int8 arithmetic can overflow, so that check "
            "does not hold here: re-export with `trainer export RUN_DIR --int8 "
            "--int8-reduce-range` (7-bit weights) or on a machine like this one, or serve "
            "CLASSIFIER_PRECISION=fp32")


def gate_refusal(gate: dict, variant: str, path: Path, attributes: Iterable[str] = (),
                 saturates: bool | None = None) -> str | None:
    """Why the gate refuses `variant` (served from `path`), or None when it may serve.
    `attributes`: the model's attribute heads, each of which must have passed too;
    `saturates`: `cpu_refusal`'s."""
    entry = gate.get("variants", {}).get(variant)
    if entry is None:
        checked = sorted(name for name, e in gate.get("variants", {}).items() if e.get("passed"))
        return (f"{variant} was not checked for accuracy when the model was exported "
                f"(passed: {checked}); re-export on a machine that runs it, or serve one of those")
    if entry.get("error"):
        return f"{variant} could not be checked at export: {entry['error']}"
    if entry.get("sha256") and entry["sha256"] != file_sha256(path):
        return f"{path.name} changed since its accuracy was checked at export; re-export"
    if refusal := cpu_refusal(gate, variant, saturates):
        return refusal
    reference = gate["reference_val_acc"]
    drop = reference - entry["val_acc"]
    if drop > gate.get("budget", ACCURACY_BUDGET) + 1e-9:
        return (f"{variant} loses {100 * drop:.2f} points of validation accuracy against fp32 "
                f"({entry['val_acc']:.4f} vs {reference:.4f} on {gate['val_images']} photos; "
                f"the budget is {100 * gate.get('budget', ACCURACY_BUDGET):.1f}); serve "
                f"CLASSIFIER_PRECISION=fp32 or another variant that passed")
    return head_refusal(gate, variant, attributes)


def _runnable(model: ResolvedModel, runtime: str, precision: str) -> bool:
    if precision == "int8" and not model.onnx_path.with_name(INT8_FILE).is_file():
        return False
    return runtime != OPENVINO or openvino_supports(precision)


def select_variant(model: ResolvedModel, runtime: str, precision: str, device: str = "cpu",
                   saturates: bool | None = None) -> tuple[ResolvedModel, str]:
    """The file and precision to serve on `runtime`, checked against the export's gate.

    precision auto: the fastest variant of this runtime that passed the gate, the main label
    and every attribute head, and whose check holds on this CPU (fp32 on a GPU, whose speed
    the export did not measure, and for a model without a gate). A variant the gate failed,
    for the label or any head, or did not check (on this kind of CPU), is refused with a
    ContractError; a model without any gate (not from `trainer export`) is served as asked,
    with a warning. `saturates`: `cpu_refusal`'s.
    """
    gate = model.gate
    attributes = list(model.contract.attributes or {})
    if precision == "auto":
        precision = "fp32"
        if gate is not None and device == "cpu":
            passed = [(entry.get("images_per_s", 0.0), entry["precision"])
                      for entry in gate.get("variants", {}).values()
                      if entry.get("runtime") == runtime and entry.get("passed")]
            for _, candidate in sorted(passed, reverse=True):
                name = variant_name(runtime, candidate)
                if refusal := cpu_refusal(gate, name, saturates):
                    logger.warning("CLASSIFIER_PRECISION=auto skips %s: %s", name, refusal)
                    continue
                if _runnable(model, runtime, candidate) and head_refusal(
                        gate, name, attributes) is None:
                    precision = candidate
                    break
    served = int8_variant(model) if precision == "int8" else model
    variant = variant_name(runtime, precision)
    if gate is None:
        if precision != "fp32":
            logger.warning("%s carries no accuracy gate (not written by `trainer export`): "
                           "serving %s unchecked", model.onnx_path, variant)
        return served, precision
    refusal = gate_refusal(gate, variant, served.onnx_path, attributes, saturates)
    if refusal and not (precision == "fp32" and variant not in gate.get("variants", {})):
        raise ContractError(f"CLASSIFIER_PRECISION={precision} on {runtime} refused: {refusal}")
    return served, precision


def serve_choice(model: ResolvedModel, runtime: str, precision: str, device: str = "cpu",
                 runtime_was_auto: bool = False) -> tuple[str, ResolvedModel, str]:
    """(runtime, file, precision) to serve: `select_variant` on `runtime`, and when that
    runtime was CLASSIFIER_RUNTIME=auto's pick and refuses the model (a multi-head model whose
    gate is from before every head was checked, or an OpenVINO variant that failed), ONNX
    Runtime instead, with a warning: auto must not refuse a model that ONNX Runtime fp32, the
    export's parity-checked reference, can serve."""
    try:
        return (runtime, *select_variant(model, runtime, precision, device))
    except ContractError as refused:
        if not runtime_was_auto or runtime == ONNXRUNTIME:
            raise
        logger.warning("%s; CLASSIFIER_RUNTIME=auto serves it with onnxruntime instead", refused)
        return (ONNXRUNTIME, *select_variant(model, ONNXRUNTIME, precision, device))
