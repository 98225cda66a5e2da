"""Is this a block page? A shop's "you look like a bot" answer, told apart from its last page.

A marketplace that takes a client for a bot answers 200 (or 503) with a captcha page: no
product cards, no next link. Read as a listing, that page says "no more products", and the
label's walk would end quietly. So a listing page without products is checked against its
profile's markers (text, CSS selectors, URL patterns: `SiteProfile.block_*`), and counts as
`captcha` when one matches, or `no_cards` when none does but cards were expected
(`empty_listing_is_block`). Redirect hops and error answers are checked the same way
(`block_check`), so a redirect to /errors/validateCaptcha or a captcha behind a 503 is a block,
not an outage to retry at once.

What the crawl does with a block is polite by design: it pauses the host, retries a bounded
number of times, then stops that host and says how to come back (slower, later). It never
solves a captcha and never changes identity (user agent, address, cookies) to get past one.
"""

from __future__ import annotations

import html as html_lib
import re
from functools import lru_cache

from selectolax.lexbor import LexborHTMLParser

from collector.config import SiteProfile
from collector.fetch import BlockCheck

BLOCK_REASONS = ("captcha", "no_cards")


@lru_cache(maxsize=256)
def _pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _normal(text: str) -> str:
    return " ".join(html_lib.unescape(text).split()).casefold()


def url_marker(url: str, profile: SiteProfile) -> str | None:
    """The block URL pattern `url` matches, as a short description, or None."""
    for pattern in profile.block_url_patterns:
        if _pattern(pattern).search(url):
            return f"URL matches {pattern!r}"
    return None


def page_marker(html: str, url: str, profile: SiteProfile) -> str | None:
    """The first block-page marker on this page (URL, selector or text), or None."""
    found = url_marker(url, profile)
    if found:
        return found
    tree = LexborHTMLParser(html)
    for selector in profile.block_selectors:
        if tree.css_first(selector) is not None:
            return f"element {selector!r}"
    text = _normal(html)      # the raw page: <title>Robot Check</title> counts too
    for marker in profile.block_text:
        if _normal(marker) in text:
            return f"text {marker!r}"
    return None


def listing_verdict(html: str, url: str, profile: SiteProfile,
                    n_products: int) -> tuple[str, str] | None:
    """(reason, what was seen) when this listing page is a block page, else None. A page
    with products is never one: its products are real, whatever else it shows."""
    if n_products:
        return None
    marker = page_marker(html, url, profile)
    if marker:
        return "captcha", marker
    if profile.empty_listing_is_block:
        return "no_cards", f"no product cards (card selector {profile.card!r})"
    return None


def block_check(profile: SiteProfile) -> BlockCheck:
    """For the fetcher: redirect hops (URL only) and error answers (their body too)."""
    def check(url: str, status: int, body: bytes) -> str | None:
        if url_marker(url, profile):
            return "captcha"
        if body and page_marker(body.decode("utf-8", "replace"), url, profile):
            return "captcha"
        return None
    return check
