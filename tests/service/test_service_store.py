"""The BentoML model store after a kill -9 during a save: BentoML copies a new entry into the
store file by file and points `latest` at it only at the end, so a kill leaves a version folder
with a truncated file, or with files but no model.yaml yet, and `latest` where it was. Such an
entry is refused by name with the reason, `latest` still serves the last whole model, and the
next save removes the leftovers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import bentoml
import pytest
from bentoml.exceptions import BentoMLException

from service.contract import ContractError
from service.model_store import MODEL_FILE, resolve_model, save_to_store

NAME = "store-integrity-test"


def _as_a_kill_leaves_it(tag: str, previous: str, damage) -> Path:
    """Damage the entry of `tag` as an interrupted copy would, and put `latest` back."""
    model = bentoml.models.get(tag)
    entry = Path(model.path)
    damage(entry)
    (entry.parent / "latest").write_text(bentoml.models.get(previous).tag.version)
    an_hour_ago = time.time() - 3600  # the next save leaves alone what may still be copying
    for path in [entry, *entry.iterdir()]:
        os.utime(path, (an_hour_ago, an_hour_ago))
    return entry


def _truncate(entry: Path) -> None:
    data = (entry / MODEL_FILE).read_bytes()
    (entry / MODEL_FILE).write_bytes(data[: len(data) // 2])


def test_an_interrupted_save_is_refused_and_removed_by_the_next_save(tiny_onnx, tmp_path):
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# a model card\n")
    whole = save_to_store(tiny_onnx, name=NAME, extra_files=[card])
    assert resolve_model(whole).onnx_path.read_bytes() == tiny_onnx.read_bytes()

    cut = save_to_store(tiny_onnx, name=NAME, extra_files=[card])
    cut_entry = _as_a_kill_leaves_it(cut, whole, _truncate)
    with pytest.raises(ContractError, match=r"incomplete: model.onnx does not match the checksum"):
        resolve_model(cut)
    unfinished = save_to_store(tiny_onnx, name=NAME, extra_files=[card])
    unfinished_entry = _as_a_kill_leaves_it(unfinished, whole,
                                            lambda entry: (entry / "model.yaml").unlink())
    with pytest.raises(ContractError, match="cannot be read .* export again"):
        resolve_model(unfinished)
    assert resolve_model(f"{NAME}:latest").tag == whole  # latest never moved to either
    with pytest.raises(BentoMLException):
        bentoml.models.list(NAME)  # what the leftovers do to `bentoml models list`

    in_flight = save_to_store(tiny_onnx, name=NAME, extra_files=[card])
    in_flight_entry = Path(bentoml.models.get(in_flight).path)
    _truncate(in_flight_entry)  # as if another export were copying it right now

    newest = save_to_store(tiny_onnx, name=NAME, extra_files=[card])
    assert not cut_entry.exists() and not unfinished_entry.exists()
    assert in_flight_entry.exists()  # too recent to be a leftover
    (in_flight_entry / MODEL_FILE).write_bytes(tiny_onnx.read_bytes())  # its copy completes
    assert {str(m.tag) for m in bentoml.models.list(NAME)} == {whole, in_flight, newest}
    assert resolve_model(f"{NAME}:latest").tag == newest
    stored = bentoml.models.get(newest).info.metadata["files"]
    assert set(stored) == {MODEL_FILE, "MODEL_CARD.md"}
