"""Review-page fixtures: a real manifest over real demo photos, and the app as a real process."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
from pathlib import Path

import imagehash
import pytest
from PIL import Image

from collector.dedup import run_dedup
from collector.manifest import MANIFEST_FILE, Manifest
from loadtests.servers import start_review

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "reports" / "review-screenshots"
PER_LABEL = 20  # enough for 5-fold ranking to put the planted mislabels on top
XSS_TITLE = '<img src=x onerror="document.body.dataset.pwned=1">Size chart'


def _store(root: Path, data: bytes) -> tuple[str, str]:
    sha = hashlib.sha256(data).hexdigest()
    relative = f"images/{sha[:2]}/{sha}.jpg"
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    (root / relative).write_bytes(data)
    return relative, sha


def add_stored(manifest: Manifest, root: Path, photo: Path, label: str, url: str, *,
               shop: str, title: str, product_id: str) -> int:
    data = photo.read_bytes()
    image_id = manifest.add_image(
        url, label, product_id=product_id, product_title=title, shop=shop,
        product_url=f"https://{shop}/p/{product_id}", page_url=f"https://{shop}/s?k={label}")
    relative, sha = _store(root, data)
    with Image.open(photo) as image:
        width, height = image.size
        phash = str(imagehash.phash(image))
    manifest.mark_stored(image_id, path=relative, size=len(data), width=width, height=height,
                         fmt="JPEG", sha256=sha, phash=phash)
    return image_id


def build_review_manifest(root: Path, catalog: Path, per_label: int = PER_LABEL) -> dict:
    """A collection folder as `collector crawl` leaves it: manifest.sqlite + images/.

    Per label `per_label` real photos from two shops, plus: one exact duplicate (same photo
    twice under 'dress'), one cross-label conflict (a 'shirt' photo also under 't-shirt'),
    one stored file that is not a JPEG any more, a title carrying HTML, and three photos
    filed under the wrong label. The collector's own
    dedup pass assigns statuses and groups.
    """
    root.mkdir(parents=True, exist_ok=True)
    labels = sorted(p.name for p in catalog.iterdir() if p.is_dir())
    ids: dict[str, list[int]] = {}
    with Manifest(root / MANIFEST_FILE) as manifest:
        for label in labels:
            photos = sorted((catalog / label).glob("*.jpg"))[:per_label]
            for n, photo in enumerate(photos):
                shop = "shop-a.example" if n % 2 == 0 else "shop-b.example"
                title = f"{label.replace('-', ' ').title()} no. {n + 1}, cotton"
                ids.setdefault(label, []).append(add_stored(
                    manifest, root, photo, label, f"https://{shop}/img/{label}/{n}.jpg",
                    shop=shop, title=title, product_id=f"{label}-{n}"))
        dress0 = min((catalog / "dress").glob("*.jpg"))
        duplicate = add_stored(manifest, root, dress0, "dress", "https://shop-b.example/img/d0.jpg",
                               shop="shop-b.example", title="Dress no. 1 (repost)",
                               product_id="dress-repost")
        shirt0 = min((catalog / "shirt").glob("*.jpg"))
        conflict = add_stored(manifest, root, shirt0, "t-shirt",
                              "https://shop-a.example/img/ts-shirt.jpg", shop="shop-a.example",
                              title="Classic tee (actually a shirt)", product_id="tee-x")
        xss = add_stored(manifest, root, max((catalog / "hat").glob("*.jpg")), "hat",
                         "https://shop-a.example/img/chart.jpg", shop="shop-a.example",
                         title=XSS_TITLE, product_id="chart")
        # Mislabelled on purpose, as scraped searches are: the titles tell the truth.
        mislabelled = []
        for n, (photo_label, wrong_label) in enumerate([("shoes", "hat"), ("pants", "dress"),
                                                        ("skirt", "shoes")]):
            photo = sorted((catalog / photo_label).glob("*.jpg"))[-1 - n]
            mislabelled.append(add_stored(
                manifest, root, photo, wrong_label, f"https://shop-b.example/img/wrong{n}.jpg",
                shop="shop-b.example", title=f"{photo_label.title()} (found under {wrong_label})",
                product_id=f"wrong-{n}"))
        broken_id = manifest.add_image("https://shop-b.example/img/broken.jpg", "pants",
                                       product_id="broken", product_title="Broken file",
                                       shop="shop-b.example")
        relative, sha = _store(root, b"\xff\xd8\xff\xe0 this is not a whole JPEG")
        manifest.mark_stored(broken_id, path=relative, size=30, width=100, height=100,
                             fmt="JPEG", sha256=sha, phash="ffffffffffffffff")
        run_dedup(manifest, threshold=4)
    return {"root": root, "manifest": root / MANIFEST_FILE, "labels": labels, "ids": ids,
            "duplicate": duplicate, "conflict": conflict, "xss": xss, "broken": broken_id,
            "mislabelled": mislabelled}


@pytest.fixture()
def review_manifest(request, tmp_path: Path, demo_catalog: Path) -> dict:
    per_label = getattr(request, "param", PER_LABEL)  # parametrize(..., indirect=True) to shrink
    return build_review_manifest(tmp_path / "collected", demo_catalog, per_label)


@pytest.fixture()
def review_server(review_manifest: dict, tmp_path: Path):
    with start_review(review_manifest["manifest"], log_dir=tmp_path) as server:
        yield server


@pytest.fixture(scope="session")
def screenshots() -> Path:
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    return SCREENSHOTS


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def ensure_chromium() -> Path:
    """Debian's chromium; installed here when missing (CI machines start without it)."""
    if not CHROMIUM.exists() and shutil.which("apt-get"):
        subprocess.run("apt-get update -q && DEBIAN_FRONTEND=noninteractive "
                       "apt-get install -y -q chromium", shell=True, check=False,
                       capture_output=True, timeout=600)
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing and could not be installed: run `make chromium` "
                    "(apt-get install chromium) as root")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = ensure_chromium()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(executable),
                                              args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def row(manifest: Path, image_id: int) -> sqlite3.Row:
    db = sqlite3.connect(manifest)
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
    finally:
        db.close()


def open_page(browser, url: str, requests: list[str]):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    page.errors = errors
    return page


def card(page, image_id: int):
    return page.locator(f'#grid .card[data-id="{image_id}"]')


def wait_for_thumbnails(page, first: int = 10) -> None:
    """Thumbnails are made on first request: wait for the top cards before a screenshot."""
    page.wait_for_function(
        f"[...document.querySelectorAll('.card img')].slice(0, {first})"
        ".every(img => img.complete && img.naturalWidth > 0)", timeout=60_000)
