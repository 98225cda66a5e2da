"""soak-collect in miniature: a few seconds' worth of the faulty demo shop, crawled for real
(shop and crawl in their own processes), every listed image accounted for; and the
accounting itself, shown a manifest that lost, left unfinished and added images.

The figures (RSS, seconds) are not judged here: the machine is shared and tests carry no
wall-clock bounds. What is checked is that the soak's bookkeeping is complete and can fail.
"""

from __future__ import annotations

import json

from benchmarks.soak_collect import (
    FINAL_STATUSES,
    SoakCollectConfig,
    account,
    build_catalog,
    run_soak_collect,
)
from collector.manifest import open_manifest
from tests.conftest import DEMO_CATALOG


def test_soak_collect_accounts_for_every_listed_image(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "68719476736")   # what `make test` exports
    config = SoakCollectConfig(duration_s=5, rate=40, catalog=DEMO_CATALOG, warmup_s=0,
                               sample_every_s=0.2, out=tmp_path)
    report = run_soak_collect(config)

    assert report.exit_code == 0 and not report.timed_out
    a = report.accounting
    assert a.complete, (a.missing, a.extra, a.not_final, a.wrong_url)
    assert a.offered > 100 and sum(a.counts.values()) == a.offered
    assert set(a.counts) <= set(FINAL_STATUSES)
    assert a.counts["ok"] > 0 and a.counts["duplicate"] > 0
    # Every fault the shop plants ends where the collector's docs say it does.
    for reason in ("rejected: corrupt", "rejected: not_an_image", "rejected: too_many_pixels",
                   "rejected: too_small", "rejected: off_topic_title", "failed: http_404",
                   "failed: refused_address", "blocked: robots"):
        assert a.reasons.get(reason, 0) > 0, (reason, a.reasons)
    assert report.retries and report.requests and report.requests > a.offered
    assert report.samples >= 2 and 0 < report.rss_first_mb <= report.rss_max_mb
    assert report.malloc_env == {}     # measured as `collector crawl` runs, not as make's
    assert report.passed

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["accounting"]["counts"] == a.counts
    assert saved["commit"] and saved["load_average"] and saved["rss_max_mb"] > 0
    assert (tmp_path / "rss_samples.csv").read_text().startswith("seconds,rss_mb\n")


def test_soak_collect_accounting_names_lost_unfinished_and_extra_rows(tmp_path):
    plan = {"listings": {"hat": ["H1", "H2", "H3", "H1"], "shoes": ["S1", "H1"]},
            "products": {"H1": {"faults": []}, "H2": {"faults": ["robots"]},
                         "H3": {"faults": ["offsite"]}, "S1": {"faults": []}}}
    shop = "http://127.0.0.1:1"
    with open_manifest(tmp_path) as manifest:
        manifest.add_image(f"{shop}/img/H1/full.jpg", "hat", product_id="H1")
        blocked = manifest.add_image(f"{shop}/private/img/H2/full.jpg", "hat", product_id="H2")
        manifest.mark_unusable(blocked, "blocked", "robots")
        manifest.add_image(f"{shop}/img/H3/full.jpg", "hat", product_id="H3")  # not /out/
        manifest.add_image(f"{shop}/img/S9/full.jpg", "shoes", product_id="S9")  # never listed
        # shoes/S1 and shoes/H1 have no row at all
    result = account(plan, tmp_path / "manifest.sqlite")

    assert result.offered == 5                 # H1 twice under hat counts once
    assert result.missing == ["shoes/H1", "shoes/S1"]
    assert result.extra == ["shoes/S9"]
    assert result.not_final == ["hat/H1: pending", "hat/H3: pending"]
    assert result.wrong_url == ["hat/H3: /img/H3/full.jpg"]
    assert result.counts == {"pending": 3, "blocked": 1}
    assert result.reasons == {"blocked: robots": 1}
    assert not result.complete


def test_soak_collect_catalog_repeats_photos_to_size(tmp_path):
    counts = build_catalog(DEMO_CATALOG, tmp_path / "catalog", per_label=45)
    assert len(counts) == 10 and set(counts.values()) == {30}   # 30 photos a label, shipped
    hats = sorted((tmp_path / "catalog" / "hat").iterdir())
    assert len(hats) == 45
    assert hats[0].read_bytes() == hats[30].read_bytes() != hats[1].read_bytes()
