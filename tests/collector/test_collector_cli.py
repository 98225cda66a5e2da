"""The `collector` command as a user runs it: help, clear config errors, status, export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def collector(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collector", *args], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_collector_help_lists_commands_and_defaults():
    top = collector("--help")
    assert top.returncode == 0
    for command in ("crawl", "status", "review", "rank", "export"):
        assert command in top.stdout
    export = collector("export", "--help")
    assert "--seed" in export.stdout and "(default: 0.1)" in export.stdout


def test_collector_bad_sources_exit_with_the_field(tmp_path):
    bad = tmp_path / "sources.yaml"
    bad.write_text("categories:\n  dress: [http://127.0.0.1:1/s]\n"
                   "sites:\n  x:\n    card: div\npoliteness:\n  concurrency_per_host: lots\n")
    result = collector("crawl", str(bad))
    assert result.returncode == 1
    assert "politeness.concurrency_per_host" in result.stderr
    assert "Traceback" not in result.stderr


def test_collector_status_and_export_commands(crawled, tmp_path):
    status = collector("status", "--data", str(crawled))
    assert status.returncode == 0, status.stderr
    assert "rejected" in status.stdout and "t-shirt" in status.stdout
    missing = collector("status", "--data", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "collector crawl" in missing.stderr

    out = tmp_path / "dataset"
    export = collector("export", "--data", str(crawled), "--out", str(out), "--zip")
    assert export.returncode == 0, export.stderr
    assert (out / "manifest.csv").is_file() and (tmp_path / "dataset.zip").is_file()
    assert "train" in export.stdout and "archive:" in export.stdout
    again = collector("export", "--data", str(crawled), "--out", str(out))
    assert again.returncode == 1 and "--overwrite" in again.stderr


def test_collector_every_collection_command_takes_data():
    for command in ("status", "review", "rank", "export"):
        result = collector(command, "--help")
        assert result.returncode == 0, result.stderr
        assert "--data" in result.stdout and "--manifest" not in result.stdout, command
    # the old door still opens, with the same flags
    old = subprocess.run([sys.executable, "-m", "collector.review", "--help"], check=False,
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert old.returncode == 0 and "--data" in old.stdout


def test_collector_crawl_does_not_import_the_review_page():
    # collector.review.config (plain pydantic models) is what --help needs; nothing more.
    code = ("import sys, collector.cli, collector.crawl; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('starlette', 'uvicorn', 'sklearn') or m.startswith('collector.review') "
            "and m not in ('collector.review', 'collector.review.config')))")
    probe = subprocess.run([sys.executable, "-c", code],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr


def test_collector_review_and_rank_name_a_missing_collection(tmp_path):
    for command in ("review", "rank"):
        result = collector(command, "--data", str(tmp_path / "nowhere"), "--no-browser"
                           if command == "review" else "--folds=2")
        assert result.returncode == 1 and "collector crawl" in result.stderr, command
