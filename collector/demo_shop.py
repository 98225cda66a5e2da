"""A realistic little shop on 127.0.0.1, built from any ImageFolder, with switchable faults.

    python -m collector.demo_shop --catalog demo_data/catalog --port 8765 --faults all \
        --write-sources demo_out/sources.yaml

Pages: `/search?q=LABEL&page=N` (12 cards a page, a next link), product cards with lazy images
(`src` is a data: placeholder, the photo is in `data-src` and a `data-srcset` of 3 widths, URLs
relative and protocol-relative), sponsored cards linked through `/sspa/click?url=...`, widget
cards with an empty `data-product-id`, product pages `/p/ID` with `data-old-hires`, and a
robots.txt that disallows `/private/`.

Planted for dedup to find (part of the catalog, always on): per label, one photo re-encoded
smaller as another product (near duplicate), one photo byte-identical under another product
id (exact duplicate), and, with the `dupes` fault, products listed on two pages of a label and
one product per label pair listed under a second category (a cross-label conflict).

Faults (`--faults all` or a comma list), each hitting a fixed subset of products so that
every run, and every resumed run, meets the same ones:
  429       first request answers 429 with Retry-After: 1
  500       first two requests answer 500 (a burst); a listing page does it too
  slow      the answer waits 0.8 s
  truncated the file is cut in half              -> rejected: corrupt
  corrupt   the body after the header is zeroed  -> rejected: corrupt
  html      an HTML error page served as image/jpeg -> rejected: not_an_image
  webp      WebP bytes behind a .jpg name        -> accepted, stored as .webp
  bomb      a tiny PNG that claims 60 MP          -> rejected: too_many_pixels
  tiny      a 40x40 thumbnail                    -> rejected: too_small
  missing   404                                  -> failed: http_404
  robots    image under /private/ (disallowed)   -> blocked: robots
  dupes     same product on two pages and under two categories
  offtopic  a product titled "<Label> gift card": its title contradicts its label
                                                 -> rejected: off_topic_title (the sources
                                                    file write_sources writes excludes it)
  offsite   the image redirects to 127.0.0.2, off the shop's address -> failed: refused_address
  captcha   one listing page answers a captcha page once -> blocked: captcha, paused, retried
Tests can also set `shop.blocking` to "captcha" or "no_cards": then every listing page is a
block page, as when a marketplace has decided the client is a bot.
`/_plan.json` lists which product got which fault, for tests and curious users.

Colour in titles: where `colours.json` beside the catalog names a photo's colour, its title
starts with it ("Blue Dress no. 3") and the sources file write_sources writes has a `colour`
attribute rule, so a crawl of the demo records colour per image. The file is written once by
`--write-colours` from each photo's dominant hue bucket (`photo_colour`): a cheap, honest
heuristic, noisy the way title-derived labels are (a grey background read as the garment, a
print read as its main colour); colours with fewer than MIN_COLOUR_PHOTOS photos are left out,
so about a third of the photos carry no colour word (their attribute is "unknown").
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import yaml
from PIL import Image

FAULTS = ("429", "500", "slow", "truncated", "corrupt", "html", "webp", "bomb", "tiny",
          "missing", "robots", "dupes", "offtopic", "offsite", "captcha")
# How many products per label each fault hits (deterministic: chosen by hash of the id).
_FAULT_SHARE = {"429": 1, "500": 2, "slow": 1, "truncated": 1, "corrupt": 1, "html": 1,
                "webp": 2, "bomb": 0, "tiny": 0, "missing": 0, "robots": 0, "offtopic": 0,
                "offsite": 0}
COLOURS_FILE = "colours.json"   # beside the catalog folder: "label/file.jpg" -> colour
MIN_COLOUR_PHOTOS = 10
# Title words per colour for the attribute rule (what shops also write for the same colour).
COLOUR_WORDS = {"black": ["black"], "blue": ["blue", "navy"], "grey": ["grey", "gray"],
                "orange": ["orange"], "red": ["red"], "white": ["white"], "green": ["green"],
                "pink": ["pink"], "brown": ["brown"], "yellow": ["yellow"], "purple": ["purple"]}
OFF_TOPIC = "gift card"   # what the offtopic fault's title says; write_sources excludes it
PER_PAGE = 12
WIDTHS = (200, 300)     # smaller srcset candidates; the original is the largest
_PLACEHOLDER = "data:image/gif;base64,R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAIBRAA7"
# What a marketplace shows a client it takes for a bot (200, no products, no next link).
CAPTCHA_PAGE = (
    "<!doctype html><html><head><title>Robot Check</title></head><body>"
    "<h4>Enter the characters you see below</h4><p>Sorry, we just need to make sure you're "
    "not a robot.</p><form method=\"get\" action=\"/errors/validateCaptcha\">"
    "<img src=\"/captcha/Captcha_abc.jpg\"><input id=\"captchacharacters\" "
    "name=\"field-keywords\"></form></body></html>")
NO_CARDS_PAGE = ("<!doctype html><html><head><title>Demo shop</title></head><body>"
                 "<main class=\"results\"></main><p>Sorry, something went wrong.</p>"
                 "</body></html>")


@dataclass
class DemoProduct:
    product_id: str
    label: str
    title: str
    source: Path                    # the catalog photo
    variant: str = ""               # "" | "near" (re-encoded smaller) | "exact" (same bytes)
    faults: set[str] = field(default_factory=set)


@dataclass
class ShopPlan:
    products: dict[str, DemoProduct]
    listings: dict[str, list[str]]  # label -> product ids in listing order (dupes included)

    def to_json(self) -> dict:
        return {
            "listings": self.listings,
            "products": {pid: {"label": p.label, "variant": p.variant,
                               "source": p.source.name, "faults": sorted(p.faults)}
                         for pid, p in self.products.items()},
        }


def _rank(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def photo_colour(path: Path) -> str | None:
    """The garment's colour bucket, or None when no bucket holds half of its pixels.

    The background is the median of the border pixels; pixels of the centre within 40 levels
    of it are ignored; the rest are bucketed by HSV (dark -> black, unsaturated -> white or
    grey, else by hue) and the largest bucket wins if it holds at least half of them.
    """
    import numpy as np

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    centre = rgb[12:52, 12:52].reshape(-1, 3)
    keep = np.abs(centre - np.median(border, axis=0)).max(1) > 40
    if keep.mean() < 0.2:
        return None
    pixels = centre[keep].reshape(1, -1, 3).astype(np.uint8)
    hsv = np.asarray(Image.fromarray(pixels).convert("HSV"), dtype=np.float32)[0]
    h, s, v = hsv[:, 0] * 360 / 255, hsv[:, 1] / 255, hsv[:, 2] / 255
    names = np.select(
        [v < 0.22, (s < 0.18) & (v > 0.8), s < 0.18, (h < 15) | (h >= 340), h < 40, h < 70,
         h < 165, h < 260, h < 300],
        ["black", "white", "grey", "red", "orange", "yellow", "green", "blue", "purple"], "pink")
    names = names.astype(object)
    names[(h >= 15) & (h < 40) & (s >= 0.18) & (v >= 0.22) & (v < 0.6)] = "brown"
    values, counts = np.unique(names.astype(str), return_counts=True)
    best = int(counts.argmax())
    return str(values[best]) if counts[best] / counts.sum() >= 0.5 else None


def write_colours(catalog: Path) -> Path:
    """colours.json beside the catalog: the colour of each photo whose colour is common
    enough (MIN_COLOUR_PHOTOS) to learn."""
    found = {f"{p.parent.name}/{p.name}": photo_colour(p)
             for p in sorted(catalog.glob("*/*")) if p.suffix.lower() in (".jpg", ".jpeg",
                                                                          ".png", ".webp")}
    counts: dict[str, int] = {}
    for colour in found.values():
        if colour:
            counts[colour] = counts.get(colour, 0) + 1
    kept = {key: colour for key, colour in found.items()
            if colour and counts[colour] >= MIN_COLOUR_PHOTOS}
    path = catalog.parent / COLOURS_FILE
    path.write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
    return path


def load_colours(catalog: Path) -> dict[str, str]:
    path = Path(catalog).parent / COLOURS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def build_plan(catalog: Path, faults: set[str], per_label: int | None = None) -> ShopPlan:
    labels = sorted(p.name for p in catalog.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not labels:
        raise SystemExit(f"{catalog}: no label folders (expected an ImageFolder: LABEL/*.jpg)")
    colours = load_colours(catalog)

    def title(label: str, path: Path, rest: str) -> str:
        colour = colours.get(f"{label}/{path.name}")
        return f"{colour.title()} {label.title()}{rest}" if colour else f"{label.title()}{rest}"

    products: dict[str, DemoProduct] = {}
    listings: dict[str, list[str]] = {}
    for label in labels:
        files = sorted(f for f in (catalog / label).iterdir()
                       if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))[:per_label]
        ids = []
        for n, path in enumerate(files):
            pid = f"{label[:3].upper()}{_rank(label + path.name)[:8]}"
            products[pid] = DemoProduct(pid, label, title(label, path, f" no. {n + 1}"), path)
            ids.append(pid)
        # Planted duplicates: a smaller re-encode and a byte copy, each its own product.
        if len(files) >= 2:
            near = f"{ids[0]}N"
            products[near] = DemoProduct(near, label, title(label, files[0], " (outlet)"),
                                         files[0], variant="near")
            exact = f"{ids[1]}X"
            products[exact] = DemoProduct(exact, label, title(label, files[1], " (reseller)"),
                                          files[1], variant="exact")
            ids[3:3] = [near, exact]
        listings[label] = ids
    # Faults hit fixed, disjoint products: the ones with the lowest hash for each fault.
    # Photos that have a planted copy stay clean, so every planted pair is there to find.
    has_copy = {pid[:-1] for pid, p in products.items() if p.variant}
    plain = sorted((pid for pid, p in products.items() if not p.variant and pid not in has_copy),
                   key=lambda pid: _rank("fault" + pid))
    cursor = 0
    for fault, share in _FAULT_SHARE.items():
        if fault not in faults:
            continue
        count = share * len(labels) if share else 1
        for pid in plain[cursor:cursor + count]:
            products[pid].faults.add(fault)
            if fault == "offtopic":     # a search lists what its title says is no such thing
                products[pid].title = f"{products[pid].label.title()} {OFF_TOPIC}"
        cursor += count
    if "dupes" in faults:
        for i, label in enumerate(labels):
            ids = listings[label]
            if len(ids) > PER_PAGE + 2:             # promoted: also shown on page 2
                ids.insert(PER_PAGE + 1, ids[5])
            other = labels[(i + 1) % len(labels)]
            if other != label:                      # same product under a second category
                cross = next(pid for pid in reversed(ids) if not products[pid].faults)
                listings[other].insert(2, cross)
    return ShopPlan(products, listings)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up (a killed crawl) are normal here, not tracebacks


class DemoShop:
    """The shop as an object: `start()` serves in a daemon thread, `stop()` ends it."""

    def __init__(self, catalog: Path, faults: set[str] | None = None, port: int = 0,
                 per_label: int | None = None, host: str = "127.0.0.1",
                 crawl_delay: float | None = None):
        unknown = set(faults or ()) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; choose from {FAULTS}")
        self.catalog = Path(catalog)
        self.faults = set(faults or ())
        self.crawl_delay = crawl_delay
        self.plan = build_plan(self.catalog, self.faults, per_label)
        self.colours = sorted(set(load_colours(self.catalog).values()))
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self.blocking: str | None = None  # "captcha" | "no_cards": every listing page is one
        self.server = _QuietServer((host, port), _handler_for(self))
        self.server.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> DemoShop:
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def hit(self, key: str) -> int:
        """How many times this key was requested, this one included."""
        with self.lock:
            self.hits[key] = self.hits.get(key, 0) + 1
            return self.hits[key]

    # -- content -------------------------------------------------------------------------
    def image_url(self, product: DemoProduct, width: int | None = None) -> str:
        base = ("/private/img" if "robots" in product.faults else
                "/out" if "offsite" in product.faults else "/img")
        name = f"w{width}.jpg" if width else "full.jpg"
        return f"{base}/{product.product_id}/{name}"

    def card(self, product: DemoProduct, position: int) -> str:
        link = f"/p/{product.product_id}?ref=sr_{position}"
        if position % 7 == 3:  # sponsored: tracked through a redirect
            link = f"/sspa/click?adId=A{position}&url={quote(link, safe='')}"
        srcset = ", ".join(
            [f"{self.image_url(product, w)} {w}w" for w in WIDTHS] +
            # the largest candidate protocol-relative, as CDNs write them
            [f"//{urlsplit(self.url).netloc}{self.image_url(product)} 400w"])
        title = html.escape(product.title)
        return (f'<div class="product-card" data-product-id="{product.product_id}">'
                f'<a class="product-link" href="{html.escape(link)}">'
                f'<img class="lazy" src="{_PLACEHOLDER}" data-src="{self.image_url(product)}" '
                f'data-srcset="{srcset}" alt="{title}"></a>'
                f'<h3 class="title">{title}</h3><span class="price">$19.99</span></div>')

    def listing(self, label: str, page: int) -> str | None:
        ids = self.plan.listings.get(label)
        if ids is None:
            return None
        chunk = ids[(page - 1) * PER_PAGE: page * PER_PAGE]
        cards = [self.card(self.plan.products[pid], (page - 1) * PER_PAGE + i)
                 for i, pid in enumerate(chunk)]
        # A widget card ("customers also viewed") without an id: a crawler must skip it.
        cards.insert(min(4, len(cards)), '<div class="product-card" data-product-id="">'
                     '<img src="/static/banner.jpg" alt="Deals of the day"></div>')
        more = page * PER_PAGE < len(ids)
        nav = (f'<a class="next" href="/search?q={quote(label)}&amp;page={page + 1}">Next</a>'
               if more else "")
        return (f"<!doctype html><html><head><title>{html.escape(label)} | Demo shop</title>"
                f"</head><body><main class=\"results\">{''.join(cards)}</main>"
                f"<nav class=\"pagination\">{nav}</nav></body></html>")

    def product_page(self, pid: str) -> str | None:
        product = self.plan.products.get(pid)
        if product is None:
            return None
        return (f"<!doctype html><html><body><h1>{html.escape(product.title)}</h1>"
                f'<img id="main-image" src="{self.image_url(product, WIDTHS[0])}" '
                f'data-old-hires="{self.image_url(product)}"></body></html>')

    def image_bytes(self, product: DemoProduct, width: int | None) -> tuple[bytes, str]:
        data = _render(product.source, product.variant, width,
                       "webp" if "webp" in product.faults else "jpeg")
        content_type = "image/jpeg"
        if "truncated" in product.faults:
            data = data[: len(data) // 2]
        elif "corrupt" in product.faults:
            data = data[:1500] + bytes(len(data) - 1500)
        elif "html" in product.faults:
            data = b"<!doctype html><html><body><h1>Access denied</h1></body></html>"
        elif "bomb" in product.faults:
            data = _bomb()
        elif "tiny" in product.faults:
            data = _render(product.source, "", 40, "jpeg")
        return data, content_type


@lru_cache(maxsize=4096)
def _render(source: Path, variant: str, width: int | None, fmt: str) -> bytes:
    if variant in ("", "exact") and width is None and fmt == "jpeg":
        return source.read_bytes()          # the original, byte for byte
    with Image.open(source) as image:
        image = image.convert("RGB")
        if variant == "near":               # what a reseller does: shrink and re-encode
            image = image.resize((image.width * 9 // 10, image.height * 9 // 10))
        if width and width < image.width:
            image = image.resize((width, round(image.height * width / image.width)))
        out = io.BytesIO()
        image.save(out, "WEBP" if fmt == "webp" else "JPEG",
                   quality=70 if variant == "near" else 88)
        return out.getvalue()


@lru_cache(maxsize=1)
def _bomb() -> bytes:
    """A valid 1-bit PNG of 8000x8000 pixels (64 MP) in a few kB."""
    out = io.BytesIO()
    Image.new("1", (8000, 8000)).save(out, "PNG")
    return out.getvalue()


def _handler_for(shop: DemoShop) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"       # keep-alive, so clients can reuse connections
        server_version = "DemoShop/1.0"

        def log_message(self, *args: object) -> None:  # quiet: tests read their own output
            pass

        def send(self, status: int, body: bytes, content_type: str = "text/html; charset=utf-8",
                 headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            try:
                self.route()
            except (BrokenPipeError, ConnectionResetError):
                pass

        def route(self) -> None:
            shop.hit("GET " + self.path)    # every request counted: tests check retries
            parts = urlsplit(self.path)
            path, query = parts.path, parse_qs(parts.query)
            if path == "/robots.txt":
                robots = "User-agent: *\nDisallow: /private/\n"
                if shop.crawl_delay:
                    robots += f"Crawl-delay: {shop.crawl_delay}\n"
                return self.send(200, robots.encode(), "text/plain")
            if path == "/_plan.json":
                return self.send(200, json.dumps(shop.plan.to_json()).encode(),
                                 "application/json")
            if path == "/search":
                label = query.get("q", [""])[0]
                page = int(query.get("page", ["1"])[0] or 1)
                if shop.blocking:
                    return self.send(200, (CAPTCHA_PAGE if shop.blocking == "captcha"
                                           else NO_CARDS_PAGE).encode())
                if ("captcha" in shop.faults and page == 1 and label == max(shop.plan.listings)
                        and shop.hit("captcha" + self.path) == 1):
                    return self.send(200, CAPTCHA_PAGE.encode())
                if ("500" in shop.faults and page == 2 and label == min(shop.plan.listings)
                        and shop.hit(self.path) <= 2):
                    return self.send(500, b"<h1>Internal Server Error</h1>")
                body = shop.listing(label, page)
                return self.send(200 if body else 404, (body or "<h1>Not found</h1>").encode())
            if path.startswith("/p/"):
                body = shop.product_page(path[3:])
                return self.send(200 if body else 404, (body or "<h1>Not found</h1>").encode())
            if path == "/sspa/click":
                target = query.get("url", ["/"])[0]
                return self.send(302, b"", headers={"Location": target})
            if path.startswith(("/img/", "/private/img/")):
                return self.image(path)
            if path.startswith("/out/"):           # off-site: another address entirely
                port = shop.server.server_address[1]
                return self.send(302, b"", headers={
                    "Location": f"http://127.0.0.2:{port}/internal{path[4:]}"})
            return self.send(404, b"<h1>Not found</h1>")

        def image(self, path: str) -> None:
            segments = path.split("/")
            pid, name = segments[-2], segments[-1]
            product = shop.plan.products.get(pid)
            if product is None or "missing" in product.faults:
                return self.send(404, b"<h1>Not found</h1>")
            faults = product.faults
            if "429" in faults and shop.hit("429" + path) == 1:
                return self.send(429, b"slow down", headers={"Retry-After": "1"})
            if "500" in faults and shop.hit("500" + path) <= 2:
                return self.send(500, b"<h1>Internal Server Error</h1>")
            if "slow" in faults:
                time.sleep(0.8)
            width = int(name[1:].split(".")[0]) if name.startswith("w") else None
            data, content_type = shop.image_bytes(product, width)
            self.send(200, data, content_type, {"Cache-Control": "max-age=86400"})

    return Handler


def write_sources(shop: DemoShop, path: Path, output_dir: str = "collected") -> Path:
    """A ready sources.yaml that crawls this shop (fast politeness: it is our own server)."""
    netloc = urlsplit(shop.url).netloc
    config = {
        "output_dir": output_dir,
        "categories": {label: [f"{shop.url}/search?q={quote(label)}"]
                       for label in sorted(shop.plan.listings)},
        "sites": {netloc: {
            "card": "div.product-card", "id_attr": "data-product-id",
            "title": "h3.title", "link": "a.product-link", "image": "img",
            "image_attrs": ["data-srcset", "srcset", "data-src", "src"],
            "next_page": "nav.pagination a.next", "product_image": "img#main-image"}},
        "politeness": {"concurrency_per_host": 8, "requests_per_second_per_host": 200,
                       "block_pause": 0.5},
        "download": {"retries": 4, "backoff_base": 0.2, "backoff_max": 5},
        "validation": {"min_side": 64},
    }
    if shop.colours:    # the colour word the titles carry, as an attribute
        config["attributes"] = {"colour": {colour: COLOUR_WORDS.get(colour, [colour])
                                           for colour in shop.colours}}
    if "offtopic" in shop.faults:   # every label turns away a title naming something else
        config["title_rules"] = {label: {"title_exclude": [f"{OFF_TOPIC}*"]}
                                 for label in sorted(shop.plan.listings)}
        config["off_topic"] = "reject"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Written by collector.demo_shop for the shop at {shop.url}\n" +
                    yaml.safe_dump(config, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m collector.demo_shop", description=__doc__.split("\n\n")[0],
        epilog="Faults: " + ", ".join(FAULTS), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=Path("demo_data/catalog"),
                        help="an ImageFolder: LABEL/*.jpg (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--faults", default="all",
                        help="'all', 'none' or a comma list (default: %(default)s)")
    parser.add_argument("--per-label", type=int, default=None,
                        help="serve only the first N photos of each label")
    parser.add_argument("--write-sources", type=Path, default=None,
                        help="write a sources.yaml that crawls this shop, then keep serving")
    parser.add_argument("--output-dir", default="collected",
                        help="output_dir written into that sources.yaml")
    parser.add_argument("--write-colours", action="store_true",
                        help=f"(re)write {COLOURS_FILE} beside the catalog from each photo's "
                             "dominant colour, then exit")
    args = parser.parse_args(argv)
    if args.write_colours:
        print(f"wrote {write_colours(args.catalog)}")
        return
    faults = (set(FAULTS) if args.faults == "all" else set() if args.faults == "none"
              else {f.strip() for f in args.faults.split(",") if f.strip()})
    shop = DemoShop(args.catalog, faults, args.port, args.per_label)
    if args.write_sources:
        write_sources(shop, args.write_sources, args.output_dir)
    n_products = len(shop.plan.products)
    print(f"demo shop: {shop.url}  ({n_products} products, {len(shop.plan.listings)} labels, "
          f"faults: {','.join(sorted(faults)) or 'none'})", flush=True)
    if args.write_sources:
        print(f"sources: {args.write_sources}", flush=True)
    try:
        shop.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        shop.server.server_close()


if __name__ == "__main__":
    main()
