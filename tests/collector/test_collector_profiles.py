"""The shipped site profiles on saved-markup fixtures written to mirror the real pages:
Amazon search in its 2024 (h2 > a) and 2025 (a > h2) layouts, and Flipkart search, whose
hashed class names change per deploy."""

from __future__ import annotations

import random
import re
import string
from pathlib import Path

import pytest

from collector.config import SiteProfile, load_sources
from collector.extract import extract_listing
from collector.rules import decide

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[1] / "collector" / "examples"
AMAZON = load_sources(EXAMPLES / "amazon_search.yaml")
FLIPKART = load_sources(EXAMPLES / "flipkart_search.yaml")


def listing(config, fixture: str, url: str):
    html = (HERE / "data" / fixture).read_text()
    return extract_listing(html, url, config.profile_for(url))


@pytest.mark.parametrize("fixture, url, ids", [
    ("amazon_search.html", "https://www.amazon.com/s?k=sneakers",
     ["B0C9X4KQ7M", "B07PQ8T2RZ", "B0B5TRAIL1"]),
    ("amazon_in_2025_search.html", "https://www.amazon.in/s?k=saree",
     ["B0DKSAREE1", "B0CPSAREE2", "B0D1BLOUS3"]),
])
def test_collector_amazon_profile_reads_both_layouts(fixture, url, ids):
    page = listing(AMAZON, fixture, url)
    assert [p.product_id for p in page.products] == ids
    assert page.skipped_cards == 1                         # the widget with an empty data-asin
    host = url.split("/")[2]
    for product in page.products:                          # every card's link and title
        assert re.fullmatch(rf"https://{re.escape(host)}/[^?]+/dp/{product.product_id}/.*",
                            product.product_url), product.product_url
        assert product.title and not product.title.startswith("Sponsored")
        assert product.image_url.startswith("https://m.media-amazon.com/images/I/")
    sponsored = page.products[0]                           # /sspa/click?...&url= unwrapped
    assert "/sspa/" not in sponsored.product_url and "ref=sr_1_1_sspa" in sponsored.product_url
    # the srcset's 3x candidate: WebP bytes behind a .jpg name (validation stores .webp)
    assert sponsored.image_url.endswith("_AC_UL960_FMwebp_QL65_.jpg")
    assert page.next_url.startswith(f"https://{host}/s?k=") and "page=2" in page.next_url


def test_collector_amazon_2025_links_wrap_the_title():
    """The 2024-only selector `h2 a` finds no product link on the 2025 layout."""
    url = "https://www.amazon.in/s?k=saree"
    old = SiteProfile(**{**AMAZON.profile_for(url).model_dump(), "link": "h2 a"})
    html = (HERE / "data" / "amazon_in_2025_search.html").read_text()
    assert [p.product_url for p in extract_listing(html, url, old).products] == [None] * 3
    page = listing(AMAZON, "amazon_in_2025_search.html", url)
    assert page.products[1].extra["brand"] == "Sidhidata"     # the brand h2 is not the title
    assert page.products[1].title == "Women's Georgette Printed Saree with Unstitched Blouse"
    assert page.products[0].extra == {"price": "₹1,299", "rating": "4.1 out of 5 stars",
                                      "brand": "SILKWEAVE"}    # not the struck-out M.R.P.


@pytest.mark.parametrize("config, fixture, url", [
    (AMAZON, "amazon_in_2025_search.html", "https://www.amazon.in/s?k=saree"),
    (FLIPKART, "flipkart_2025_search.html", "https://www.flipkart.com/search?q=saree"),
])
def test_collector_profiles_title_rules_turn_away_the_blouse(config, fixture, url):
    decisions = [decide(config, "saree", p.title) for p in listing(config, fixture, url).products]
    assert [d.title_verdict for d in decisions] == ["on_topic", "on_topic", "off_topic"]
    assert decisions[2].reject_reason == "off_topic_title"
    assert decisions[2].title_rule == "exclude 'saree blouse*'"


def rehash_classes(html: str, seed: int) -> str:
    """What a new Flipkart deploy does: every class name becomes another hash."""
    rng = random.Random(seed)
    names: dict[str, str] = {}

    def new(match: re.Match) -> str:
        fresh = " ".join(names.setdefault(c, "".join(rng.choices(string.ascii_letters, k=6)))
                         for c in match.group(1).split())
        return f'class="{fresh}"'
    return re.sub(r'class="([^"]*)"', new, html)


def test_collector_flipkart_profile_and_another_deploy():
    url = "https://www.flipkart.com/search?q=saree"
    html = (HERE / "data" / "flipkart_2025_search.html").read_text()
    profile = FLIPKART.profile_for(url)
    page = extract_listing(html, url, profile)
    assert [p.product_id for p in page.products] == ["SARH2KANJI1", "SARGZPRINT2",
                                                     "BLOH3STRCH3"]
    for product in page.products:
        assert re.fullmatch(rf"https://www\.flipkart\.com/[a-z0-9-]+/p/itm[0-9a-f]+\?pid="
                            rf"{product.product_id}&.*", product.product_url)
        # the card's 312 px (or its 2x 612 px) rewritten to ask for 832 px
        assert re.fullmatch(r"https://rukminim\d\.flixcart\.com/image/832/832/xif0q/.+\.jpeg"
                            r"\?q=70", product.image_url), product.image_url
    assert page.products[0].title == "Woven Kanjivaram Pure Silk Saree"
    assert page.products[0].extra == {"rating": "4.2"}
    assert page.next_url == "https://www.flipkart.com/search?q=saree&otracker=search&page=2"
    for seed in range(3):          # no selector depends on a class name
        again = extract_listing(rehash_classes(html, seed), url, profile)
        assert again.products == page.products and again.next_url == page.next_url
        assert [p.extra for p in again.products] == [p.extra for p in page.products]
    assert rehash_classes(html, 0) != html


def test_collector_shipped_profiles_load():
    for config in (AMAZON, FLIPKART):
        assert config.title_rules["saree"].title_exclude
    assert AMAZON.profile_for("https://www.amazon.com/s?k=x") == \
        AMAZON.profile_for("https://www.amazon.in/s?k=x")
