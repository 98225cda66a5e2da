"""Model-assisted review: out-of-sample predictions point at the mislabelled photos, and one
key on the page accepts the model's suggestion."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from collector.review.config import RankConfig
from collector.review.embeddings import embed_files, load_backbone, penultimate_tensor
from collector.review.rank import rank
from collector.review.ranking import rank_label_issues
from collector.review.store import ImageQuery, ReviewStore
from service.contract import ModelContract
from tests.review.conftest import card, open_page, row, wait_for_thumbnails


def test_review_rank_finds_mislabelled_photos_and_p_accepts_the_suggestion(
        review_manifest, review_server, browser, screenshots):
    manifest = review_manifest["manifest"]
    result = rank(RankConfig(data=manifest, model="imagenet", threads=2))
    store = ReviewStore(manifest)
    visible = store.summary()["total"]
    assert result["unreadable"] == 1                      # the broken file, left out
    assert result["ranked"] == visible - 1
    assert result["out_of_sample_agreement"] > 0.6        # ImageNet features know clothes

    top = store.list_images(ImageQuery(sort="suspect", limit=15)).items
    top_ids = [item["id"] for item in top]
    wrong = review_manifest["mislabelled"]
    assert set(wrong) <= set(top_ids), (wrong, [(i["id"], i["effective_label"],
                                                 i["predicted_label"]) for i in top])
    truths = {"hat": "shoes", "dress": "pants", "shoes": "skirt"}
    predicted = {i["id"]: i["predicted_label"] for i in top}
    hits = sum(predicted[w] == truths[row(manifest, w)["label"]] for w in wrong)
    assert hits >= 2, predicted

    # Re-ranking reuses the cached embeddings: the cache file is not rewritten.
    cache = next((manifest.parent / ".review").glob("embeddings-*.npz"))
    before = cache.stat().st_mtime_ns
    again = rank(RankConfig(data=manifest, model="imagenet", threads=2))
    assert cache.stat().st_mtime_ns == before
    assert again["out_of_sample_agreement"] == result["out_of_sample_agreement"]

    # The page, sorted by suspect score: predictions on the cards, and p accepts one.
    page = open_page(browser, review_server.url + "/#sort=suspect", [])
    target = wrong[0]
    page.wait_for_selector(f'#grid .card[data-id="{target}"] .pred.disagree')
    wait_for_thumbnails(page)
    page.screenshot(path=str(screenshots / "09-suspects.png"))
    suggestion = card(page, target).locator(".pred-label").text_content()
    card(page, target).click()
    page.keyboard.press("p")
    page.wait_for_selector(f'#grid .card[data-id="{target}"][data-label="{suggestion}"]')
    accepted = row(manifest, target)
    assert (accepted["review_status"], accepted["review_label"]) == ("approved", suggestion)
    assert accepted["review_reason"].startswith(f"model suggestion: {suggestion}")
    page.screenshot(path=str(screenshots / "10-suggestion-accepted.png"))
    assert not page.errors, page.errors
    page.close()


def test_review_ranking_math_flags_flipped_labels_out_of_sample():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 3
    labels = [f"c{k}" for k in range(4) for _ in range(40)]
    features = np.concatenate([centers[k] + rng.normal(size=(40, 16)) for k in range(4)])
    noisy = list(labels)
    flipped = [3, 50, 90, 130]
    for i in flipped:
        noisy[i] = "c0" if labels[i] != "c0" else "c1"
    issues = rank_label_issues(features, noisy, folds=5)
    worst = set(np.argsort(-issues.suspect_score)[:len(flipped)].tolist())
    assert worst == set(flipped)
    assert issues.confident_disagreement[flipped].all()
    assert np.allclose(issues.probs.sum(axis=1), 1.0)


def tiny_classifier(path, labels: list[str], head: str = "gemm") -> str:
    """A real (small) ONNX classifier: conv -> pool -> 8-d features -> linear head."""
    rng = np.random.default_rng(0)
    conv = numpy_helper.from_array(rng.normal(size=(8, 3, 8, 8)).astype(np.float32), "conv_w")
    weight = numpy_helper.from_array(
        rng.normal(size=(len(labels), 8) if head == "gemm" else (8, len(labels)))
        .astype(np.float32), "fc_w")
    bias = numpy_helper.from_array(np.zeros(len(labels), np.float32), "fc_b")
    nodes = [helper.make_node("Conv", ["input", "conv_w"], ["c"], strides=[8, 8]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["features"])]
    if head == "gemm":
        nodes.append(helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"],
                                      transB=1))
    else:
        nodes += [helper.make_node("MatMul", ["features", "fc_w"], ["mm"]),
                  helper.make_node("Add", ["mm", "fc_b"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                      ["n", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", len(labels)])],
        initializer=[conv, weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnxruntime 1.31 reads IR <= 13; make_model writes 14
    contract = ModelContract(version="tiny", labels=labels, architecture="tiny")
    for key, value in contract.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("head", ["gemm", "matmul"])
def test_review_trained_run_backbone_exposes_pooled_features(review_manifest, tmp_path, head):
    labels = review_manifest["labels"]
    run = tmp_path / "run"
    path = tiny_classifier(run / "export" / "model.onnx", labels, head)
    assert penultimate_tensor(onnx.load(path)) == "features"
    backbone = load_backbone(str(run))          # a trainer run folder, as users pass it
    assert backbone.model_id.startswith("onnx-")
    store = ReviewStore(review_manifest["manifest"])
    files = [store.file_for(i)[0] for i in review_manifest["ids"]["dress"][:3]]
    files.append(store.file_for(review_manifest["broken"])[0])
    features = embed_files(backbone, files)
    assert features.shape == (4, 8)
    assert np.allclose(np.linalg.norm(features[:3], axis=1), 1.0, atol=1e-5)
    assert np.isnan(features[3]).all()          # the broken file: a NaN row, order kept
