"""Exact and near-duplicate clusters over every stored image, then keep / duplicate / conflict.

Runs as one pass over the manifest after downloading, not online while downloading, so the
outcome depends only on the set of images and never on the order they arrived in: a crawl
killed and resumed ends exactly where an uninterrupted one does.

Clusters: images with the same sha256, or whose 64-bit phashes differ in at most
`hamming_threshold` bits, joined transitively (union-find). Then per cluster:
  - one effective label: the largest image (pixels, then bytes, then sha256, then url) is
    kept as `ok`; the rest become `duplicate` (exact_duplicate or near_duplicate), dup_of it;
  - two or more labels: every member becomes `conflict` (reason names the labels); the
    reviewer may approve members, otherwise none is exported.
`group_id` is the kept (or would-be-kept) image's id for every member, so the export keeps a
cluster on one side of the split.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from collector.manifest import Manifest

_POPCOUNT = np.array([(i).bit_count() for i in range(256)], dtype=np.uint8)


@dataclass(frozen=True)
class DedupSummary:
    images: int
    clusters: int
    kept: int
    duplicates: int
    conflicts: int           # images in clusters that span labels
    conflict_clusters: int


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def hamming_matrix_row(hashes: np.ndarray, i: int) -> np.ndarray:
    """Bit distances from hash i to all hashes (hashes: uint8 [n, 8])."""
    return _POPCOUNT[np.bitwise_xor(hashes, hashes[i])].sum(axis=1)


def cluster(sha256s: list[str], phashes: list[str], threshold: int) -> list[int]:
    """Cluster index (root position) for each image."""
    n = len(sha256s)
    uf = _UnionFind(n)
    first_by_sha: dict[str, int] = {}
    for i, sha in enumerate(sha256s):
        if sha in first_by_sha:
            uf.union(first_by_sha[sha], i)
        else:
            first_by_sha[sha] = i
    if n:
        hashes = np.frombuffer(bytes.fromhex("".join(phashes)), dtype=np.uint8).reshape(n, 8)
        # O(n^2) in numpy: ~1 s per 10k images; a BK-tree only pays off far beyond that.
        for i in range(n - 1):
            near = np.nonzero(hamming_matrix_row(hashes[i:], 0) <= threshold)[0]
            for j in near[1:]:
                uf.union(i, i + int(j))
    return [uf.find(i) for i in range(n)]


def run_dedup(manifest: Manifest, threshold: int) -> DedupSummary:
    rows = manifest.query(
        "SELECT id, url, label, COALESCE(review_label, label) AS effective_label, sha256, "
        "phash, width, height, bytes FROM images "
        "WHERE status IN ('downloaded', 'ok', 'duplicate', 'conflict') ORDER BY id")
    roots = cluster([r["sha256"] for r in rows], [r["phash"] for r in rows], threshold)
    members: dict[int, list] = defaultdict(list)
    for row, root in zip(rows, roots):
        members[root].append(row)

    outcomes = []
    kept = duplicates = conflicts = conflict_clusters = 0
    for group in members.values():
        best = max(group, key=lambda r: (r["width"] * r["height"], r["bytes"],
                                         _neg(r["sha256"]), _neg(r["url"])))
        labels = sorted({r["effective_label"] for r in group})
        if len(labels) > 1:
            conflict_clusters += 1
            reason = "labels: " + ", ".join(labels)
            for r in group:
                outcomes.append((r["id"], "conflict", reason, best["id"], None))
                conflicts += 1
            continue
        for r in group:
            if r["id"] == best["id"]:
                outcomes.append((r["id"], "ok", None, best["id"], None))
                kept += 1
            else:
                reason = ("exact_duplicate" if r["sha256"] == best["sha256"]
                          else "near_duplicate")
                outcomes.append((r["id"], "duplicate", reason, best["id"], best["id"]))
                duplicates += 1
    manifest.set_dedup(outcomes)
    return DedupSummary(len(rows), len(members), kept, duplicates, conflicts, conflict_clusters)


def _neg(text: str) -> tuple[int, ...]:
    """Sort key that makes max() prefer the smallest string (a stable, content-based tie-break)."""
    return tuple(-ord(c) for c in text)
