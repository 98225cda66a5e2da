"""Sources config: what to crawl and how, from one YAML file, checked before any request.

Errors name the bad field by its path in the YAML (`sites.shop.card: ...`), unknown keys are
errors (a typo such as `politness:` must not be silently ignored), and CSS selectors are
compiled up front so a broken selector fails at load time, not after an hour of crawling.
See collector/examples/ for complete files and docs/collect.md for a worked Amazon-like
profile.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
    model_validator,
)
from selectolax.lexbor import LexborHTMLParser

from collector.rules import check_patterns


class ConfigError(ValueError):
    """The sources file is unusable; the message names the file and every bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_PROBE = LexborHTMLParser("<html><body></body></html>")

# What marketplaces answer a client they take for a bot (a 200 or 503 page with no products),
# for the Amazon and Flipkart families; every profile starts from these (collector.blocks).
BLOCK_TEXT = (
    "Enter the characters you see below",                          # Amazon's captcha
    "Type the characters you see in this image",
    "Sorry, we just need to make sure you're not a robot",
    "To discuss automated access to Amazon data please contact",
    "Robot Check",                                                 # its <title>
    "Are you a human?",                                            # Flipkart
)
BLOCK_SELECTORS = (
    'form[action*="validateCaptcha"]', "#captchacharacters",      # Amazon
    ".g-recaptcha", 'iframe[src*="recaptcha"]', 'script[src*="recaptcha"]',  # reCAPTCHA
)
BLOCK_URL_PATTERNS = (r"/errors/validateCaptcha", r"(?i)/captcha(?:[/?.]|$)")


def _check_selector(value: str | None) -> str | None:
    if value is None:
        return value
    try:
        _PROBE.css(value)
    except Exception as exc:  # noqa: BLE001 (selectolax raises its own error types)
        raise ValueError(f"invalid CSS selector {value!r}: {exc}") from None
    return value


def check_label(label: str) -> str:
    """A label becomes a folder name on export: nothing that could leave the export folder."""
    if (not label.strip() or label != label.strip() or "/" in label or "\\" in label
            or label.startswith(".") or "\0" in label):
        raise ValueError(f"label {label!r} cannot be a folder name: use letters, digits, "
                         "'-' or '_' (no '/', '\\' or leading '.')")
    return label


class ImageRewrite(_Strict):
    """One regex substitution on image URLs (re.sub: `\\g<1>` refers to a group)."""

    pattern: str = Field(description="regular expression searched in the image URL")
    replace: str = Field(description="its replacement")

    @model_validator(mode="after")
    def _compiles(self) -> ImageRewrite:
        try:
            re.compile(self.pattern).sub(self.replace, "")   # also parses the replacement
        except re.error as exc:
            raise ValueError(f"image rewrite {self.pattern!r} -> {self.replace!r}: "
                             f"{exc}") from None
        return self

    def apply(self, url: str) -> str:
        return re.sub(self.pattern, self.replace, url)


class SiteProfile(_Strict):
    """How to read one shop's listing (and product) pages."""

    card: str = Field(description="CSS selector of one product card on a listing page")
    id_attr: str | None = Field(
        None, description="card attribute holding the product id (e.g. data-asin)")
    skip_cards_without_id: bool = Field(
        True, description="skip cards whose id attribute is missing or empty (ads, widgets)")
    title: str | None = Field(None, description="CSS selector of the title, inside the card")
    link: str | None = Field(None, description="CSS selector of the product link, inside the card")
    image: str = Field("img", description="CSS selector of the product image, inside the card")
    image_attrs: list[str] = Field(
        default_factory=lambda: ["srcset", "data-srcset", "data-old-hires", "data-src", "src"],
        min_length=1,
        description="image attributes to read, best first; *srcset ones give their largest "
                    "candidate")
    next_page: str | None = Field(None, description="CSS selector of the next-page link")
    redirect_params: list[str] = Field(
        default_factory=lambda: ["url", "u", "redirect", "target"],
        description="query parameters of tracking/redirect links that carry the real URL")
    product_image: str = Field(
        "img", description="CSS selector of the main image on a product page "
                           "(used with follow_product_pages)")
    product_image_attrs: list[str] = Field(
        default_factory=lambda: ["data-old-hires", "srcset", "data-srcset", "data-src", "src"],
        min_length=1, description="like image_attrs, for the product page image")
    image_rewrites: list[ImageRewrite] = Field(
        default_factory=list,
        description="regex rewrites of image URLs, applied in order, e.g. ask a CDN whose "
                    "path sets the size for a larger one (Flipkart's /image/312/312/)")
    extra: dict[str, str] = Field(
        default_factory=dict,
        description="more card fields to keep, name -> CSS selector inside the card (its "
                    "text), e.g. {price: span.a-price span.a-offscreen}; stored per product "
                    "and written to the export's manifest.csv as extra_NAME")

    block_text: list[str] = Field(
        default_factory=lambda: list(BLOCK_TEXT),
        description="text of a block page (captcha, bot check), matched case-insensitively "
                    "on a page without products; the default covers the Amazon and Flipkart "
                    "families")
    block_selectors: list[str] = Field(
        default_factory=lambda: list(BLOCK_SELECTORS),
        description="CSS selectors found on block pages (a captcha form, reCAPTCHA)")
    block_url_patterns: list[str] = Field(
        default_factory=lambda: list(BLOCK_URL_PATTERNS),
        description="regular expressions of block-page URLs, checked on every redirect "
                    "hop too (e.g. /errors/validateCaptcha)")
    empty_listing_is_block: bool = Field(
        True, description="a listing page with no product cards counts as a block page "
                          "(no_cards): shops answer bots with pages that look normal but hold "
                          "no results; turn off if a category may really be empty")

    _selectors = field_validator("card", "title", "link", "image", "next_page",
                                 "product_image")(_check_selector)

    @field_validator("block_selectors")
    @classmethod
    def _check_block_selectors(cls, selectors: list[str]) -> list[str]:
        for selector in selectors:
            _check_selector(selector)
        return selectors

    @field_validator("block_url_patterns")
    @classmethod
    def _check_block_url_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return patterns

    @field_validator("extra")
    @classmethod
    def _check_extra(cls, extra: dict[str, str]) -> dict[str, str]:
        for name, selector in extra.items():
            if not name.isidentifier():
                raise ValueError(f"extra field name {name!r}: use letters, digits and '_'")
            _check_selector(selector)
        return extra


class TitleRule(_Strict):
    """Word patterns a product title must (include) or must not (exclude) contain."""

    title_include: list[str] = Field(
        default_factory=list, description="the title must match one of these (empty: any)")
    title_exclude: list[str] = Field(
        default_factory=list, description="a title matching one of these is off topic")

    _patterns = field_validator("title_include", "title_exclude")(check_patterns)


class LabelRule(TitleRule):
    """One rule of a label_rules split: products whose title fits go to `label`."""

    label: str = Field(description="the label a fitting product is filed under")

    @field_validator("label")
    @classmethod
    def _label(cls, label: str) -> str:
        return check_label(label)

    @model_validator(mode="after")
    def _has_include(self) -> LabelRule:
        if not self.title_include:
            raise ValueError(f"label rule for {self.label!r} needs title_include patterns")
        return self


class Limits(_Strict):
    max_pages: int = Field(20, ge=1, description="listing pages to follow per start URL")
    max_images_per_label: int = Field(1000, ge=1, description="products kept per label")


class Politeness(_Strict):
    concurrency_per_host: int = Field(4, ge=1, le=64, description="requests in flight per host")
    requests_per_second_per_host: float = Field(
        5.0, gt=0, description="average request rate per host (leaky bucket)")
    obey_robots: bool = Field(True, description="skip URLs that robots.txt disallows")
    user_agent: str = Field(
        "product-classifier-collector/0.1 (+https://github.com/; dataset building)",
        min_length=1)
    allowed_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="loopback, private, link-local or reserved networks the crawl may reach "
                    "besides the start URLs' own addresses (e.g. 10.20.0.0/16 for an intranet "
                    "CDN); anything else non-public is refused before connecting (SSRF guard)")
    allow_private_networks: bool = Field(
        False, description="turn the SSRF guard off: any address may be reached, including "
                           "127.0.0.1, 169.254.169.254 and private ranges (only for a trusted "
                           "network)")
    block_retries: int = Field(
        3, ge=0, le=20, description="block pages (captcha, no cards) a host may answer in a "
                                    "row before the crawl stops it; each one pauses the host")
    block_pause: float = Field(
        60.0, ge=0, description="seconds a host is paused after its first block page; "
                                "doubles with each further one")
    block_pause_max: float = Field(900.0, ge=0, description="cap on one block-page pause")


class Download(_Strict):
    max_bytes: int = Field(20_000_000, ge=1024, description="abort a response past this size")
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(20.0, gt=0, description="longest silence while reading")
    total_timeout: float = Field(60.0, gt=0,
                                 description="cap on one attempt, for servers that trickle")
    retries: int = Field(4, ge=0, le=20,
                         description="retries on connection errors, timeouts, 5xx and 429")
    backoff_base: float = Field(0.5, ge=0, description="first backoff in seconds (doubles)")
    backoff_max: float = Field(30.0, ge=0, description="cap on one backoff or Retry-After wait")
    max_redirects: int = Field(5, ge=0, le=20,
                               description="redirects followed per request, each hop checked "
                                           "like a new URL; more -> too_many_redirects")


class Validation(_Strict):
    min_side: int = Field(64, ge=1, description="reject images whose short side is smaller")
    max_pixels: int = Field(50_000_000, ge=1, description="reject larger images as bombs")


class Dedup(_Strict):
    hamming_threshold: int = Field(
        6, ge=0, le=32, description="phash bits that may differ for two images to be near-dups")


class SourcesConfig(_Strict):
    """A sources.yaml file."""

    output_dir: Path = Field(Path("collected"),
                             description="manifest.sqlite and images/ go here (relative to "
                                         "the YAML file)")
    categories: dict[str, list[str]] = Field(
        default_factory=dict, description="label -> start URLs (search or category pages)")
    url_lists: dict[str, Path] = Field(
        default_factory=dict,
        description="label -> text file of image URLs, one a line (no listing pages: the "
                    "img2dataset-style input; relative to the YAML file)")
    sites: dict[str, SiteProfile] = Field(
        default_factory=dict,
        description="host[:port] -> profile; a single profile applies to all")
    follow_product_pages: bool = Field(
        False, description="open each product page for the full-size image")
    title_rules: dict[str, TitleRule] = Field(
        default_factory=dict,
        description="label -> title_include / title_exclude patterns: a product whose title "
                    "contradicts its label is off topic (see off_topic)")
    off_topic: Literal["reject", "flag"] = Field(
        "reject", description="off-topic titles: 'reject' (status rejected, reason "
                              "off_topic_title, never downloaded) or 'flag' (kept, marked for "
                              "the review page)")
    attributes: dict[str, dict[str, list[str]]] = Field(
        default_factory=dict,
        description="attribute -> value -> title patterns, e.g. {colour: {red: [red, "
                    "maroon], blue: [blue, navy]}}: each product gets the one value its "
                    "title names, 'unknown' when none or several match")
    label_rules: dict[str, list[LabelRule]] = Field(
        default_factory=dict,
        description="category -> rules that split its broad listing into labels by title "
                    "(first fitting rule wins; no fit: rejected, no_label_rule)")
    limits: Limits = Limits()
    politeness: Politeness = Politeness()
    download: Download = Download()
    validation: Validation = Validation()
    dedup: Dedup = Dedup()

    @field_validator("categories")
    @classmethod
    def _check_categories(cls, categories: dict[str, list[str]]) -> dict[str, list[str]]:
        for label, urls in categories.items():
            check_label(label)
            if not urls:
                raise ValueError(f"label {label!r} has no start URLs")
            for url in urls:
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.netloc:
                    raise ValueError(f"label {label!r}: {url!r} is not an http(s) URL")
        return categories

    @field_validator("url_lists")
    @classmethod
    def _check_url_lists(cls, url_lists: dict[str, Path]) -> dict[str, Path]:
        for label in url_lists:
            check_label(label)
        return url_lists

    @model_validator(mode="after")
    def _every_url_has_a_profile(self) -> SourcesConfig:
        if not self.categories and not self.url_lists:
            raise ValueError("nothing to collect: give categories (label -> start URLs) "
                             "or url_lists (label -> file of image URLs)")
        if len(self.sites) == 1 or not self.categories:
            return self
        for label, urls in self.categories.items():
            for url in urls:
                if urlsplit(url).netloc not in self.sites:
                    raise ValueError(f"categories.{label}: no site profile for host "
                                     f"{urlsplit(url).netloc!r} (sites has "
                                     f"{sorted(self.sites)})")
        return self

    @field_validator("attributes")
    @classmethod
    def _check_attributes(cls, attributes: dict[str, dict[str, list[str]]]):
        for name, values in attributes.items():
            if not name.isidentifier():
                raise ValueError(f"attribute name {name!r}: use letters, digits and '_'")
            if not values:
                raise ValueError(f"attribute {name!r} has no values")
            for value, patterns in values.items():
                if value == "unknown":
                    raise ValueError(f"attribute {name!r}: 'unknown' is reserved (it means "
                                     "no value or several matched)")
                if not patterns:
                    raise ValueError(f"attribute {name!r}, value {value!r}: no patterns")
                check_patterns(patterns)
        return attributes

    @model_validator(mode="after")
    def _rules_name_known_labels(self) -> SourcesConfig:
        for source in self.label_rules:
            if source not in self.categories:
                raise ValueError(f"label_rules.{source}: not a category (label_rules split "
                                 f"a category's listing; categories has "
                                 f"{sorted(self.categories)})")
        known = (set(self.categories) | set(self.url_lists) |
                 {rule.label for rules in self.label_rules.values() for rule in rules})
        for label in self.title_rules:
            if label not in known:
                raise ValueError(f"title_rules.{label}: no such label (labels are "
                                 f"{sorted(known)})")
        return self

    @model_validator(mode="after")
    def _categories_need_a_profile(self) -> SourcesConfig:
        if self.categories and not self.sites:
            raise ValueError("categories need at least one site profile under 'sites' "
                             "(how to find product cards on the listing pages)")
        return self

    def profile_for(self, url: str) -> SiteProfile:
        if len(self.sites) == 1:
            return next(iter(self.sites.values()))
        return self.sites[urlsplit(url).netloc]


def _format(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field (typo?)"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def load_sources(path: str | Path) -> SourcesConfig:
    """Read and validate a sources YAML; output_dir is made relative to the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with 'categories' and 'sites', "
                          f"got {type(raw).__name__}")
    try:
        config = SourcesConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc.error_count()} problem(s)\n{_format(exc)}") from None
    if not config.output_dir.is_absolute():
        config.output_dir = (path.parent / config.output_dir).resolve()
    for label, url_file in config.url_lists.items():
        url_file = url_file if url_file.is_absolute() else (path.parent / url_file).resolve()
        if not url_file.is_file():
            raise ConfigError(f"{path}: 1 problem(s)\n  url_lists.{label}: no such file "
                              f"{url_file}")
        config.url_lists[label] = url_file
    return config
