"""Listing page HTML -> product records (id, title, product URL, best image URL), next page.

Pure functions over text: no network here, so every quirk of real shops is unit-testable on a
saved page. Handles: srcset (largest `w` or `x` candidate, commas inside URLs), lazy-load
attributes with data: placeholders in `src`, relative and protocol-relative URLs, tracking
redirect links that carry the real target in a query parameter (`/sspa/click?url=/dp/...`),
JSON image maps (`data-a-dynamic-image`), cards without an id (ads, widgets) skipped, image
URL rewrites (a CDN's size in the path -> a larger one) and extra card fields (price...).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urljoin, urlsplit

from selectolax.lexbor import LexborHTMLParser, LexborNode

from collector.config import SiteProfile

_DESCRIPTOR = re.compile(r"^(\d+(?:\.\d+)?)([wxh])$")


@dataclass(frozen=True)
class Product:
    product_id: str
    title: str
    product_url: str | None
    image_url: str | None
    position: int
    extra: dict[str, str] = field(default_factory=dict, compare=False)  # profile.extra fields


@dataclass
class ListingPage:
    products: list[Product] = field(default_factory=list)
    next_url: str | None = None
    skipped_cards: int = 0           # cards without an id (sponsored widgets, carousels)
    cards_without_image: int = 0


def parse_srcset(value: str) -> list[tuple[str, float]]:
    """srcset -> [(url, size)], size = width for `w`, density for `x` (1.0 if absent).

    Follows the HTML spec's tokeniser: a URL runs to the next whitespace, so commas inside
    URLs (Amazon's `._AC_SR38,50_.jpg`) survive; a trailing comma ends a bare candidate.
    """
    out: list[tuple[str, float]] = []
    i, n = 0, len(value)
    while i < n:
        while i < n and (value[i].isspace() or value[i] == ","):
            i += 1
        start = i
        while i < n and not value[i].isspace():
            i += 1
        url = value[start:i]
        if not url:
            break
        descriptor = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            start = i
            while i < n and value[i] != ",":
                i += 1
            descriptor = value[start:i].strip()
        size = 1.0
        match = _DESCRIPTOR.match(descriptor.split()[0]) if descriptor else None
        if match:
            size = float(match.group(1))
        if url:
            out.append((url, size))
    return out


def largest_candidate(srcset: str) -> str | None:
    candidates = parse_srcset(srcset)
    if not candidates:
        return None
    # max() keeps the first of equal sizes: the order the shop listed them in.
    return max(candidates, key=lambda c: c[1])[0]


def _largest_from_json(value: str) -> str | None:
    """`{"https://.../a.jpg": [355, 500], ...}` (Amazon's data-a-dynamic-image)."""
    try:
        mapping = json.loads(value)
    except ValueError:
        return None
    if not isinstance(mapping, dict) or not mapping:
        return None

    def area(item: tuple[str, object]) -> float:
        dims = item[1]
        if isinstance(dims, list) and len(dims) >= 2:
            try:
                return float(dims[0]) * float(dims[1])
            except (TypeError, ValueError):
                return 0.0
        return 0.0

    return max(mapping.items(), key=area)[0]


def unwrap_redirect(url: str, params: list[str], depth: int = 3) -> str:
    """`https://shop/sspa/click?...&url=%2Fdp%2FB0..` -> `https://shop/dp/B0..`."""
    for _ in range(depth):
        query = parse_qs(urlsplit(url).query)
        target = next((query[p][0] for p in params if p in query and query[p][0]), None)
        if not target or not (target.startswith(("/", "http"))):
            return url
        url = urljoin(url, target)
    return url


def resolve_url(base: str, href: str | None, redirect_params: list[str]) -> str | None:
    """Relative, protocol-relative (`//cdn/x.jpg`) and redirect links -> absolute http(s)."""
    if not href:
        return None
    href = href.strip()
    if not href or href.startswith(("data:", "javascript:", "#", "about:", "blob:")):
        return None
    url = urljoin(base, href)
    if urlsplit(url).scheme not in ("http", "https"):
        return None
    url = unwrap_redirect(url, redirect_params)
    return url.split("#", 1)[0]


def pick_image(node: LexborNode, attrs: list[str], base: str,
               redirect_params: list[str]) -> str | None:
    """The first usable image URL from `attrs`, best first; srcset gives its largest."""
    for attr in attrs:
        value = node.attributes.get(attr)
        if not value or not value.strip():
            continue
        value = value.strip()
        if value.startswith("{"):
            candidate = _largest_from_json(value)
        elif attr.endswith("srcset"):
            candidate = largest_candidate(value)
        else:
            candidate = value
        url = resolve_url(base, candidate, redirect_params)
        if url:
            return url
    return None


def rewrite_image(url: str | None, profile: SiteProfile) -> str | None:
    """The profile's image_rewrites, in order (e.g. a CDN size in the path -> a larger one)."""
    for rewrite in profile.image_rewrites if url else ():
        url = rewrite.apply(url)
    return url


def _text(node: LexborNode | None) -> str:
    if node is None:
        return ""
    return " ".join(node.text(separator=" ").split())


def extract_listing(html: str, page_url: str, profile: SiteProfile) -> ListingPage:
    tree = LexborHTMLParser(html)
    page = ListingPage()
    params = profile.redirect_params
    for position, card in enumerate(tree.css(profile.card)):
        raw_id = (card.attributes.get(profile.id_attr) or "").strip() if profile.id_attr else ""
        if profile.id_attr and not raw_id and profile.skip_cards_without_id:
            page.skipped_cards += 1
            continue
        link_node = card.css_first(profile.link) if profile.link else None
        product_url = resolve_url(page_url, link_node.attributes.get("href") if link_node
                                  else None, params)
        image_node = card.css_first(profile.image)
        image_url = (pick_image(image_node, profile.image_attrs, page_url, params)
                     if image_node is not None else None)
        image_url = rewrite_image(image_url, profile)
        if image_url is None:
            page.cards_without_image += 1
        title = _text(card.css_first(profile.title)) if profile.title else ""
        if not title and image_node is not None:
            title = (image_node.attributes.get("alt") or "").strip()
        product_id = raw_id or product_url or image_url
        if not product_id:  # nothing to identify or fetch: not a product
            continue
        extra = {name: text for name, selector in profile.extra.items()
                 if (text := _text(card.css_first(selector)))}
        page.products.append(Product(product_id, title, product_url, image_url, position,
                                     extra))
    if profile.next_page:
        next_node = tree.css_first(profile.next_page)
        if next_node is not None:
            page.next_url = resolve_url(page_url, next_node.attributes.get("href"), params)
    return page


def extract_product_image(html: str, page_url: str, profile: SiteProfile) -> str | None:
    """The full-size image on a product page (follow_product_pages)."""
    tree = LexborHTMLParser(html)
    for node in tree.css(profile.product_image):
        url = pick_image(node, profile.product_image_attrs, page_url, profile.redirect_params)
        if url:
            return rewrite_image(url, profile)
    return None
