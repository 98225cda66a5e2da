"""Model-assisted review: rank every collected image by how likely its label is wrong.

    python -m collector.review.rank --manifest crawl/manifest.sqlite            # ImageNet Lite0
    python -m collector.review.rank --manifest crawl/manifest.sqlite --model runs/r1

Embeds each stored image once (cached on disk by content hash and backbone, so re-ranking
after a round of relabelling only refits the k-fold logistic regression), computes
out-of-sample probabilities against the CURRENT effective labels (reviewer decisions
included; rejected images are left out of the fit), and stores one prediction per image in
`review_predictions`, which the review page shows on every card and sorts by.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from collector.review.config import RankConfig
from collector.review.embeddings import Backbone, embed_files, load_backbone
from collector.review.ranking import rank_label_issues
from collector.review.store import ReviewError, ReviewStore

console = Console(stderr=True)


def cache_dir_for(manifest: Path) -> Path:
    manifest = Path(manifest).resolve()
    return (manifest if manifest.is_dir() else manifest.parent) / ".review"


def embed_with_cache(backbone: Backbone, keys: list[str], paths: list[Path],
                     cache_file: Path) -> np.ndarray:
    """Embeddings for `paths`, reusing rows cached under the same key (content hash)."""
    cached: dict[str, np.ndarray] = {}
    if cache_file.is_file():
        try:
            with np.load(cache_file) as saved:
                cached = dict(zip(saved["keys"].tolist(), saved["features"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # lost time, not an error
            console.print(f"[yellow]ignoring unreadable embedding cache {cache_file}")
    todo = [i for i, key in enumerate(keys) if key not in cached]
    if todo:
        with Progress(TextColumn("embedding"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("embed", total=len(todo))
            fresh = embed_files(backbone, [paths[i] for i in todo],
                                progress=lambda n: bar.advance(task, n))
        for i, row in zip(todo, fresh):
            cached[keys[i]] = row
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + ".tmp.npz")
        np.savez(tmp, keys=np.array(list(cached)), features=np.stack(list(cached.values())))
        os.replace(tmp, cache_file)
    return np.stack([cached[key] for key in keys]) if keys else np.zeros((0, 1), np.float32)


def rank(config: RankConfig) -> dict:
    """Compute and store predictions; returns a small summary."""
    store = ReviewStore(config.data)
    rows = [row for row in store.stored_images() if row["review_status"] != "rejected"
            and _inside_store(store, row)]
    if len(rows) < 2 * config.folds:
        raise ValueError(f"only {len(rows)} images to rank; need at least {2 * config.folds}")
    backbone = load_backbone(config.model, threads=config.threads)
    keys = [row["sha256"] or f"id{row['id']}" for row in rows]
    paths = [store.image_path(row["id"], row["path"]) for row in rows]
    cache = (config.cache_dir or cache_dir_for(config.data)) / \
        f"embeddings-{backbone.model_id}.npz"
    features = embed_with_cache(backbone, keys, paths, cache)
    usable = ~np.isnan(features).any(axis=1)
    if usable.sum() < 2 * config.folds:
        raise ValueError("too few images decoded to rank; check the stored files")
    labels = [row["effective_label"] for row in rows]
    kept = np.flatnonzero(usable)
    with console.status("k-fold logistic regression"):
        issues = rank_label_issues(features[kept], [labels[i] for i in kept], folds=config.folds)
    out = []
    for j, i in enumerate(kept):
        probs = {c: round(float(p), 4) for c, p in zip(issues.classes, issues.probs[j])}
        out.append((rows[i]["id"], labels[i], issues.classes[issues.predicted[j]],
                    issues.probs[j, issues.predicted[j]], issues.self_confidence[j],
                    issues.suspect_score[j], bool(issues.confident_disagreement[j]), probs))
    store.save_predictions(out, model=backbone.model_id)
    agree = float(np.mean(issues.predicted == issues.given))
    return {"ranked": len(out), "unreadable": int((~usable).sum()), "model": backbone.model_id,
            "out_of_sample_agreement": round(agree, 4),
            "confident_disagreements": int(issues.confident_disagreement.sum())}


def _inside_store(store: ReviewStore, row) -> bool:
    try:
        store.image_path(row["id"], row["path"])
    except ReviewError:
        console.print(f"[yellow]skipping image {row['id']}: its file {row['path']!r} is "
                      "outside the image store")
        return False
    return True
