"""Listing page parsing on saved HTML: srcset, lazy attributes, redirects, widget cards."""

from __future__ import annotations

from pathlib import Path

from collector.config import SiteProfile, load_sources
from collector.extract import (
    extract_listing,
    extract_product_image,
    largest_candidate,
    parse_srcset,
    resolve_url,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_collector_srcset_largest_candidate():
    assert largest_candidate("a.jpg 200w, b.jpg 800w, c.jpg 400w") == "b.jpg"
    assert largest_candidate("a.jpg, b.jpg 2x, c.jpg 1.5x") == "b.jpg"
    # commas inside URLs (Amazon crops) and a bare candidate ending in a comma
    assert parse_srcset("x._SR38,50_.jpg 1x, y._SR76,100_.jpg 2x") == [
        ("x._SR38,50_.jpg", 1.0), ("y._SR76,100_.jpg", 2.0)]
    assert parse_srcset("only.jpg,") == [("only.jpg", 1.0)]
    assert largest_candidate("  ") is None


def test_collector_url_resolution():
    base = "https://shop.test/search?q=x&page=2"
    assert resolve_url(base, "/img/a.jpg", []) == "https://shop.test/img/a.jpg"
    assert resolve_url(base, "//cdn.test/a.jpg", []) == "https://cdn.test/a.jpg"
    assert resolve_url(base, "b.jpg#zoom", []) == "https://shop.test/b.jpg"
    assert resolve_url(base, "data:image/gif;base64,R0lGOD", []) is None
    assert resolve_url(base, "javascript:void(0)", []) is None
    wrapped = "/sspa/click?ie=UTF8&url=%2FShoe%2Fdp%2FB01%2Fref%3Dsr_1%3Fk%3Dshoe"
    assert resolve_url(base, wrapped, ["url"]) == "https://shop.test/Shoe/dp/B01/ref=sr_1?k=shoe"
    assert resolve_url(base, wrapped, []) .startswith("https://shop.test/sspa/click")


def test_collector_amazon_like_page_with_the_readme_profile():
    config = load_sources(REPO / "collector" / "examples" / "amazon_like.yaml")
    profile = config.profile_for("https://www.amazon.com/s?k=sneakers")
    html = (HERE / "data" / "amazon_search.html").read_text()
    page = extract_listing(html, "https://www.amazon.com/s?k=sneakers", profile)

    assert [p.product_id for p in page.products] == ["B0C9X4KQ7M", "B07PQ8T2RZ", "B0B5TRAIL1"]
    assert page.skipped_cards == 1                       # the empty data-asin video widget
    sponsored, plain, trail = page.products
    # sponsored: the redirect is unwrapped to the real product path
    assert sponsored.product_url == ("https://www.amazon.com/Runfast-Womens-Running-Lightweight"
                                     "-Sneakers/dp/B0C9X4KQ7M/ref=sr_1_1_sspa?keywords=sneakers"
                                     "&qid=1700000000&sr=8-1-spons&psc=1")
    assert sponsored.title == "Runfast Women's Running Shoes Lightweight Sneakers"
    # the 3x candidate of the srcset, not the 1x src
    assert sponsored.image_url == ("https://m.media-amazon.com/images/I/"
                                   "71Qk1mB0ZUL._AC_UL960_FMwebp_QL65_.jpg")
    assert plain.image_url.endswith("61Zb3H0Q+xL._AC_UL960_QL65_.jpg")
    assert plain.product_url.startswith("https://www.amazon.com/Classic-Canvas-Low-Top-Sneaker/dp/")
    # protocol-relative, and a comma inside the URL
    assert trail.image_url == "https://m.media-amazon.com/images/I/81trailXyzL._AC_SR76,100_.jpg"
    assert page.next_url == "https://www.amazon.com/s?k=sneakers&page=2&qid=1700000000&ref=sr_pg_1"


def test_collector_lazy_images_and_widgets_without_id():
    profile = SiteProfile(card="li.item", id_attr="data-id", title=".name", link="a",
                          image="img", image_attrs=["data-srcset", "srcset", "data-src", "src"])
    html = """
    <ul>
      <li class="item" data-id="p1"><a href="/p/1"><img src="data:image/gif;base64,AAAA"
          data-src="/lazy/1.jpg"></a><span class="name"> Red   Dress </span></li>
      <li class="item" data-id="p2"><img data-srcset="/s/2-200.jpg 200w, /s/2-900.jpg 900w"
          src="/s/2-200.jpg" alt="Blue dress"></li>
      <li class="item"><img src="/ads/banner.jpg"></li>
      <li class="item" data-id="p4"><span class="name">No photo</span></li>
    </ul>"""
    page = extract_listing(html, "http://shop.test/c/dresses", profile)
    got = {p.product_id: p for p in page.products}
    assert got["p1"].image_url == "http://shop.test/lazy/1.jpg"
    assert got["p1"].title == "Red Dress"
    assert got["p2"].image_url == "http://shop.test/s/2-900.jpg"
    assert got["p2"].title == "Blue dress"                  # falls back to alt text
    assert got["p4"].image_url is None and page.cards_without_image == 1
    assert page.skipped_cards == 1


def test_collector_product_page_full_size_image():
    profile = SiteProfile(card="div", product_image="#landingImage",
                          product_image_attrs=["data-old-hires", "data-a-dynamic-image", "src"])
    hires = ('<img id="landingImage" src="https://m.media-amazon.com/images/I/7.SX300.jpg" '
             'data-old-hires="https://m.media-amazon.com/images/I/7._AC_SL1500_.jpg">')
    assert extract_product_image(hires, "https://www.amazon.com/dp/B1", profile).endswith(
        "_AC_SL1500_.jpg")
    dynamic = ('<img id="landingImage" src="/s.jpg" data-a-dynamic-image="{&quot;https://i.test'
               '/a.jpg&quot;:[355,500],&quot;https://i.test/b.jpg&quot;:[710,1000]}">')
    assert extract_product_image(dynamic, "https://www.amazon.com/dp/B1", profile) == \
        "https://i.test/b.jpg"
