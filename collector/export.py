"""Manifest -> dataset: a grouped, stratified train/val/test split as an ImageFolder tree.

Which images: those the manifest's EXPORTABLE rule admits (kept by dedup, or approved by a
reviewer; never rejected ones), under their effective label (a reviewer's relabel wins).
The split is sklearn's StratifiedGroupKFold with a fixed seed: label proportions are kept in
every split and a near-duplicate cluster never straddles two splits, so the test set holds no
near-copy of a training photo. The split is a function of the images' content and the seed
only: each cluster is keyed by its smallest sha256 and rows are ordered by (key, label,
sha256) before splitting, so row ids (which follow arrival order, i.e. thread timing) play no
part, and two crawls of the same shop, or a resumed and an uninterrupted crawl, export the
same folders. Output, written to a temp folder and renamed into place (a killed export
leaves no half dataset):

    OUT/train/LABEL/SHA.jpg, OUT/val/..., OUT/test/...
    OUT/manifest.csv   split, label, file, sha256, phash, group_id (the cluster's smallest
                       sha256), url, product, page, size, title verdict and rule,
                       extra_NAME (card fields), attr_NAME (attribute values, a reviewer's
                       value over the rules'); sorted by
                       split, label, file
    OUT/stats.json     images per label and split, rejects by reason, settings
    OUT.zip            optional, the same tree in one archive to hand over
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from collector.config import check_label
from collector.manifest import Manifest

SPLITS = ("train", "val", "test")
_FOLDS = 20   # split fractions are realised in steps of 1/20 = 5 %


@dataclass
class ExportResult:
    out_dir: Path
    counts: dict[str, dict[str, int]]     # label -> split -> images
    rejects: dict[str, int]               # "status: reason" -> images
    zip_path: Path | None


def assign_splits(labels: list[str], groups: list[int], val: float, test: float,
                  seed: int) -> list[str]:
    """Grouped, stratified split: every group lands in exactly one split."""
    n_test, n_val = round(test * _FOLDS), round(val * _FOLDS)
    if n_test + n_val >= _FOLDS:
        raise ValueError(f"val ({val}) + test ({test}) leave nothing to train on")
    if not labels:
        return []
    # sklearn needs at least one class with n_splits members (tiny datasets get coarser steps)
    n_splits = min(_FOLDS, len(set(groups)), max(Counter(labels).values()))
    fold_of = np.zeros(len(labels), dtype=int)
    if n_splits >= 2:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():   # "least populated class has only k members": fine
            warnings.simplefilter("ignore", UserWarning)
            for fold, (_, idx) in enumerate(splitter.split(np.zeros(len(labels)), labels,
                                                           groups)):
                fold_of[idx] = fold
    # Map folds onto splits in proportion (when there are fewer groups than _FOLDS too).
    scale = n_splits / _FOLDS
    test_folds = round(n_test * scale)
    val_folds = round(n_val * scale)
    names = []
    for fold in fold_of:
        if fold < test_folds:
            names.append("test")
        elif fold < test_folds + val_folds:
            names.append("val")
        else:
            names.append("train")
    return names


def export_dataset(manifest: Manifest, out_dir: Path, *, val: float = 0.1, test: float = 0.1,
                   seed: int = 0, make_zip: bool = False, overwrite: bool = False) -> ExportResult:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace")
    cluster_keys = manifest.cluster_keys()

    def group_key(row) -> str:
        return cluster_keys.get(row["group_id"], row["sha256"])

    # Content order, never id order: ids follow arrival order (thread timing).
    candidates = sorted(manifest.exportable_images(),
                        key=lambda r: (group_key(r), r["effective_label"], r["sha256"], r["url"]))
    rows, seen = [], set()
    for row in candidates:
        # An approved exact copy under the same label would be the same file twice: once.
        key = (row["effective_label"], row["sha256"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    labels = [r["effective_label"] for r in rows]
    for label in sorted(set(labels)):   # a manifest edited by hand must not write outside OUT
        try:
            check_label(label)
        except ValueError as exc:
            raise ValueError(f"{exc}; relabel those images on the review page") from None
    keys = [group_key(r) for r in rows]
    number = {key: n for n, key in enumerate(sorted(set(keys)))}
    splits = assign_splits(labels, [number[key] for key in keys], val, test, seed)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts: dict[str, dict[str, int]] = {}
    extras = [_json(r["extra"]) for r in rows]
    # A reviewer's attribute value wins over the title rules' (EFFECTIVE_ATTRIBUTES_SQL).
    attributes = [_json(r["effective_attributes"]) for r in rows]
    extra_names = sorted({name for e in extras for name in e})
    attribute_names = sorted({name for a in attributes for name in a})
    fields = ["split", "label", "file", "sha256", "phash", "group_id", "width", "height",
              "bytes", "format", "url", "product_id", "product_title", "product_url",
              "page_url", "review_status", "original_label", "found_under", "title_verdict",
              "title_rule", *(f"extra_{n}" for n in extra_names),
              *(f"attr_{n}" for n in attribute_names)]
    with open(tmp / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        order = sorted(range(len(rows)), key=lambda i: (
            splits[i], labels[i], Path(rows[i]["path"]).name))
        for i in order:
            row, label, split = rows[i], labels[i], splits[i]
            source = manifest.root / row["path"]
            relative = f"{split}/{label}/{Path(row['path']).name}"
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(source, target)
            counts.setdefault(label, dict.fromkeys(SPLITS, 0))[split] += 1
            writer.writerow({
                "split": split, "label": label, "file": relative, "sha256": row["sha256"],
                "phash": row["phash"], "group_id": keys[i], "width": row["width"],
                "height": row["height"], "bytes": row["bytes"], "format": row["format"],
                "url": row["url"], "product_id": row["product_id"],
                "product_title": row["product_title"], "product_url": row["product_url"],
                "page_url": row["page_url"], "review_status": row["review_status"],
                "original_label": row["label"], "found_under": row["found_under"],
                "title_verdict": row["title_verdict"], "title_rule": row["title_rule"],
                **{f"extra_{n}": extras[i].get(n, "") for n in extra_names},
                **{f"attr_{n}": attributes[i].get(n, "") for n in attribute_names}})
    rejects = {f"{status}: {reason}": n for (status, reason), n in manifest.reasons().items()}
    stats = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": seed, "fractions": {"val": val, "test": test},
        "images": len(rows), "labels": sorted(counts),
        "per_label": counts,
        "per_split": dict(Counter(splits)),
        "not_exported": rejects,
        "source_manifest": str(manifest.path),
    }
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)

    zip_path = None
    if make_zip:
        zip_path = out_dir.with_suffix(".zip")
        partial = zip_path.with_name(zip_path.name + ".tmp")
        # Photos are already compressed: store them, deflate only the text files.
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
            for path in sorted(out_dir.rglob("*")):
                if path.is_file():
                    compress = (zipfile.ZIP_DEFLATED if path.suffix in (".csv", ".json")
                                else zipfile.ZIP_STORED)
                    archive.write(path, f"{out_dir.name}/{path.relative_to(out_dir)}",
                                  compress_type=compress)
        os.replace(partial, zip_path)
    return ExportResult(out_dir, counts, rejects, zip_path)


def _json(text: str | None) -> dict:
    return json.loads(text) if text else {}


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link costs no space; across filesystems fall back to a copy.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
