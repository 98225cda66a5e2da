"""`collector check`: one listing page read with its profile, shown so a user can fix the
profile in a minute: cards, ids, titles, image sizes, the next link, block-page markers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from collector.demo_shop import write_sources
from tests.collector.conftest import start_shop

REPO = Path(__file__).resolve().parents[2]


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collector", "check", *args], check=False,
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def shop_sources(tmp_path_factory):
    shop = start_shop(faults=("tiny",), per_label=14)
    sources = write_sources(shop, tmp_path_factory.mktemp("check") / "sources.yaml")
    yield shop, sources
    shop.stop()


def test_collector_check_shows_what_the_profile_reads(shop_sources):
    shop, sources = shop_sources
    result = check(str(sources), "--label", "hat", "--images", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    shown = result.stdout
    first_page = shop.plan.listings["hat"][:12]
    assert all(pid in shown for pid in first_page)
    assert shop.plan.products[first_page[0]].title in shown
    assert f"next page: {shop.url}/search?q=hat&page=2" in shown
    assert "cards skipped (no id): 1" in shown             # the widget card
    assert "JPEG" in shown and "x5" in shown               # sizes of the downloaded images
    if any("tiny" in shop.plan.products[pid].faults for pid in first_page):
        assert "too_small" in shown
    assert "block-page markers: none" in shown


def test_collector_check_names_block_pages_and_empty_ones(shop_sources, tmp_path):
    shop, sources = shop_sources
    captcha = tmp_path / "captcha.html"
    captcha.write_text("<html><head><title>Robot Check</title></head><body><form "
                       "action='/errors/validateCaptcha'><input id='captchacharacters'>"
                       "</form></body></html>")
    result = check(str(sources), "--url", f"{shop.url}/search?q=hat", "--html", str(captcha))
    assert result.returncode == 1
    assert "block page: captcha" in result.stdout and "validateCaptcha" in result.stdout
    assert "does not solve captchas" in result.stdout

    empty = tmp_path / "empty.html"
    empty.write_text("<html><body><main class='results'></main></body></html>")
    result = check(str(sources), "--url", f"{shop.url}/search?q=hat", "--html", str(empty))
    assert result.returncode == 1 and "block page: no_cards" in result.stdout


def test_collector_check_names_a_missing_profile(tmp_path, shop_sources):
    _, sources = shop_sources
    result = check(str(sources), "--label", "no-such-label")
    assert result.returncode == 1 and "no label 'no-such-label'" in result.stderr
