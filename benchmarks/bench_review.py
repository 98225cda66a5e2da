"""`make bench-review`: is the review page still fast with 20,000 images?

Builds a 20,000-image manifest (real demo photos, reused), starts the real app process, and
times through HTTP, side by side in one run (medians of repeats):
- a page of 60 cards at the start and deep in the set, keyset (what the app does) vs OFFSET;
- a label-filtered page and a most-suspect-first page;
- a thumbnail made cold vs served from the cache.

Then label-noise ranking quality on real photos (clothing-small: benchmarks/datasets.py): flip a
known 5% of labels at random, rank, and compare side by side how well the suspect score finds
them: out-of-sample k-fold (what `collector.review.rank` does) vs the same classifier scored
on the images it was fit on (in-sample), vs chance.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from benchmarks.datasets import CLOTHING_SMALL
from collector.manifest import MANIFEST_FILE, Manifest
from collector.review.store import ImageQuery, ReviewStore, build_page_query
from loadtests.servers import start_review

REPO = Path(__file__).resolve().parents[2]
console = Console()


def build(root: Path, n_images: int, catalog: Path) -> Path:
    photos = sorted(catalog.glob("*/*.jpg"))
    (root / "images").mkdir(parents=True, exist_ok=True)
    for k, photo in enumerate(photos):
        shutil.copyfile(photo, root / "images" / f"{k}.jpg")
    labels = sorted({p.parent.name for p in photos})
    rng = random.Random(0)
    with Manifest(root / MANIFEST_FILE) as manifest, manifest.transaction():
        for n in range(n_images):
            k = n % len(photos)
            image_id = manifest.add_image(f"https://s{n % 3}.example/{n}.jpg", labels[n % 10],
                                          shop=f"s{n % 3}.example", product_title=f"item {n}")
            manifest.mark_stored(image_id, path=f"images/{k}.jpg", size=1, width=1, height=1,
                                 fmt="JPEG", sha256=f"{n:064x}", phash="0" * 16)
    with Manifest(root / MANIFEST_FILE) as manifest:
        manifest.set_dedup((i, "ok", None, i, None) for i in range(1, n_images + 1))
    store = ReviewStore(root / MANIFEST_FILE)
    store.save_predictions([(i, labels[(i - 1) % 10], labels[0], 0.5, 0.5, rng.random(), False,
                             {}) for i in range(1, n_images + 1)], model="bench")
    return root / MANIFEST_FILE


def median_ms(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def sql_page_ms(manifest: Path, repeats: int, *, offset: int | None = None,
                cursor: str | None = None) -> float:
    """One page's SQL alone: keyset (WHERE id > cursor) or LIMIT/OFFSET, the usual alternative."""
    sql, args, _, _ = build_page_query(ImageQuery(limit=60, cursor=cursor))
    if offset is not None:
        sql, args = sql.replace("LIMIT ?", "LIMIT ? OFFSET ?"), [*args, offset]
    db = sqlite3.connect(manifest)
    try:
        return median_ms(lambda: db.execute(sql, args).fetchall(), repeats)
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--catalog", type=Path, default=REPO / "demo_data" / "catalog")
    parser.add_argument("--rank-data", type=Path,
                        default=CLOTHING_SMALL)
    parser.add_argument("--rank-images", type=int, default=1500,
                        help="photos used for the ranking benchmark (0 = all)")
    parser.add_argument("--noise", type=float, default=0.05, help="fraction of labels flipped")
    parser.add_argument("--skip-paging", action="store_true")
    parser.add_argument("--skip-ranking", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_paging:
        bench_paging(args)
    if not args.skip_ranking:
        bench_ranking(args)
    return 0


def bench_ranking(args) -> None:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    from collector.review.embeddings import _imagenet_torch, _torch_backbone, load_backbone
    from collector.review.rank import embed_with_cache
    from collector.review.ranking import find_label_issues, out_of_sample_probs, reduce_features

    photos = sorted(args.rank_data.glob("*/*/*.jpg"))
    if not photos:
        console.print(f"[yellow]no photos under {args.rank_data}: ranking benchmark skipped")
        return
    rng = np.random.default_rng(0)
    if args.rank_images and args.rank_images < len(photos):
        photos = [photos[i] for i in sorted(rng.choice(len(photos), args.rank_images,
                                                       replace=False))]
    truth = [p.parent.name for p in photos]
    classes = sorted(set(truth))
    noisy = list(truth)
    flipped = rng.choice(len(photos), round(args.noise * len(photos)), replace=False)
    for i in flipped:
        noisy[i] = str(rng.choice([c for c in classes if c != truth[i]]))
    is_flipped = np.zeros(len(photos), bool)
    is_flipped[flipped] = True

    backbone = load_backbone("imagenet", threads=2)
    eager = _torch_backbone(_imagenet_torch(2))
    batch = np.random.default_rng(1).normal(size=(32, 3, 224, 224)).astype(np.float32)
    speeds = {name: 32 / (median_ms(lambda b=b: b.embed_batch(batch), 3) / 1000)
              for name, b in [("PyTorch eager", eager), ("ONNX Runtime", backbone)]}
    console.print("Lite0 features, batch of 32, 2 threads: " + ", ".join(
        f"{name} {speed:.1f} img/s" for name, speed in speeds.items()) +
        f"; ONNX Runtime / eager = {speeds['ONNX Runtime'] / speeds['PyTorch eager']:.1f}x")
    start = time.perf_counter()
    # Cached across runs (bench_out/ is not committed): re-running compares rankers only.
    features = embed_with_cache(backbone, [str(p) for p in photos], photos,
                                REPO / "bench_out" / "review-embeddings.npz")
    embed_s = time.perf_counter() - start
    ok = ~np.isnan(features).any(axis=1)
    features, noisy_ok, flags = features[ok], [noisy[i] for i in np.flatnonzero(ok)], \
        is_flipped[ok]

    def scores(probs, classes_):
        issues = find_label_issues(probs, noisy_ok, classes_)
        return issues.suspect_score

    start = time.perf_counter()
    probs, fitted_classes = out_of_sample_probs(features, noisy_ok)
    oos_s = time.perf_counter() - start
    y = np.array([fitted_classes.index(label) for label in noisy_ok])
    start = time.perf_counter()
    with threadpool_limits(limits=1):   # the same features and classifier, minus the folds
        reduced = reduce_features(features)
        in_probs = LogisticRegression(C=1.0, max_iter=500).fit(reduced, y).predict_proba(reduced)
    in_s = time.perf_counter() - start

    k = int(flags.sum())
    table = Table(title=f"finding {k} flipped labels among {len(flags)} real photos "
                        f"({args.noise:.0%} noise)")
    for column in ("scored by", "precision@k", "recall@2k", "AUROC", "fit s"):
        table.add_column(column, justify="right" if column != "scored by" else "left")
    results = {}
    for name, score, seconds in [
            ("out-of-sample 5-fold (review rank)", scores(probs, fitted_classes), oos_s),
            ("in-sample (fit on the same images)", scores(in_probs, fitted_classes), in_s),
            ("chance", rng.random(len(flags)), 0.0)]:
        order = np.argsort(-score)
        precision = flags[order[:k]].mean()
        recall = flags[order[:2 * k]].sum() / k
        auroc = roc_auc_score(flags, score)
        results[name] = (precision, recall, auroc)
        table.add_row(name, f"{precision:.2f}", f"{recall:.2f}", f"{auroc:.3f}", f"{seconds:.1f}")
    console.print(table)
    oos, ins = results["out-of-sample 5-fold (review rank)"], \
        results["in-sample (fit on the same images)"]
    console.print(f"out-of-sample / in-sample precision@k = {oos[0] / max(ins[0], 1e-9):.2f}x; "
                  f"embedding {len(photos)} photos: {embed_s:.0f} s (0 when cached)")


def bench_paging(args) -> None:

    work = Path(tempfile.mkdtemp(prefix="bench-review-"))
    server = None
    try:
        with console.status(f"building a {args.images}-image manifest"):
            manifest = build(work / "collected", args.images, args.catalog)
        server = start_review(manifest, log_dir=work)
        client = httpx.Client(base_url=server.url, timeout=60)
        deep_id = args.images - 1200  # page ~313 of 60 cards

        def get(**params):
            return lambda: client.get("/api/images", params={"limit": 60, **params}).json()

        rows = [
            ("page 1 (HTTP, keyset)", median_ms(get(), args.repeats)),
            (f"deep page after id {deep_id} (HTTP, keyset)",
             median_ms(get(cursor=str(deep_id)), args.repeats)),
            ("label filter, deep (HTTP, keyset)",
             median_ms(get(label="pants", cursor=str(deep_id)), args.repeats)),
            ("most suspect first, page 1 (HTTP)", median_ms(get(sort="suspect"), args.repeats)),
            ("summary: counts per label/shop (HTTP)",
             median_ms(lambda: client.get("/api/summary").json(), args.repeats)),
        ]
        sql_rows = [
            ("page 1 (SQL only, keyset)", sql_page_ms(manifest, args.repeats)),
            (f"deep page (SQL only, OFFSET {deep_id})",
             sql_page_ms(manifest, args.repeats, offset=deep_id)),
            ("deep page (SQL only, keyset)",
             sql_page_ms(manifest, args.repeats, cursor=str(deep_id))),
        ]

        cold, warm = [], []
        for image_id in range(1, 11):  # ten different photos: cold once each, then warm
            start = time.perf_counter()
            client.get(f"/api/images/{image_id}/thumb").raise_for_status()
            cold.append((time.perf_counter() - start) * 1000)
            warm.append(median_ms(lambda i=image_id: client.get(f"/api/images/{i}/thumb"),
                                  5))
        thumbs = [("thumbnail, first request (decode + resize + write)", statistics.median(cold)),
                  ("thumbnail, cached", statistics.median(warm))]

        table = Table(title=f"review page, {args.images} images (median of {args.repeats})")
        table.add_column("what")
        table.add_column("ms", justify="right")
        for name, ms in rows + sql_rows + thumbs:
            table.add_row(name, f"{ms:.1f}")
        console.print(table)
        offset_ratio = sql_rows[1][1] / max(sql_rows[2][1], 1e-6)
        console.print(f"deep page: OFFSET / keyset = {offset_ratio:.1f}x; "
                      f"deep / first page over HTTP = {rows[1][1] / rows[0][1]:.2f}x; "
                      f"thumbnail cold / cached = {thumbs[0][1] / thumbs[1][1]:.1f}x")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
