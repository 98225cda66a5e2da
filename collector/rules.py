"""Title rules: a product's title against word patterns -> on topic, off topic, or which label.

One matcher serves three uses, all pure functions over text (no manifest, no network), so the
same decision is made at crawl time and when rules are re-applied to an existing manifest:
  - per-label `title_include` / `title_exclude`: does this title fit the label it was found
    under (a "saree" search also lists blouses and petticoats)?
  - `label_rules`: which label one broad listing's product belongs to (first rule that fits);
  - attributes: which value of an attribute (colour: red / blue / ...) a title names;
    "unknown" when none or several values match.

Patterns are case-insensitive and match whole words of the title, with punctuation treated as
space (`t-shirt` matches "T-Shirt" and "t shirt"); `*` stands for any letters inside a word
(`saree*` matches "sarees"); a pattern starting with `re:` is a regular expression searched in
the lower-cased title.

`decide` is the crawl's one call per product; `apply_rules` re-applies the current rules to
every row of an existing manifest (the crawl runs it at start and end, so editing the rules
and re-running `collector crawl` re-files what is there without fetching it again).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collector.config import SourcesConfig
    from collector.manifest import Manifest

UNKNOWN = "unknown"
_NOT_WORD = re.compile(r"[\W_]+")


def normalise(title: str) -> str:
    """Lower case, punctuation -> space, one space between words."""
    return " ".join(_NOT_WORD.sub(" ", title.casefold()).split())


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A pattern as a regex over normalise(title); ValueError names what is wrong."""
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:], re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: "
                             f"{exc}") from None
    # Each `*`-separated piece normalised like titles are; `*` itself: letters in a word.
    pieces = [" ".join(_NOT_WORD.sub(" ", part).split()) for part in pattern.casefold().split("*")]
    body = r"[^\W_]*".join(re.escape(p).replace(r"\ ", r"\s+") for p in pieces)
    if not body.replace(r"[^\W_]*", ""):
        raise ValueError(f"pattern {pattern!r} has no letters or digits to match")
    return re.compile(rf"(?<![^\W_]){body}(?![^\W_])")


def _haystack(pattern: str, title: str) -> str:
    return title.casefold() if pattern.startswith("re:") else normalise(title)


def first_match(patterns: list[str], title: str) -> str | None:
    """The first pattern that matches the title, or None."""
    for pattern in patterns:
        if compile_pattern(pattern).search(_haystack(pattern, title)):
            return pattern
    return None


def check_patterns(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        compile_pattern(pattern)
    return patterns


@dataclass(frozen=True)
class Verdict:
    """What a title says about a label: fits or not, and the rule that decided it."""

    on_topic: bool
    rule: str | None          # e.g. "exclude 'blouse'", "include 'saree'", "no include matched"


def judge(title: str, include: list[str], exclude: list[str]) -> Verdict | None:
    """None when there is nothing to judge (no rules, or no title)."""
    if not (include or exclude) or not title.strip():
        return None
    hit = first_match(exclude, title)
    if hit is not None:
        return Verdict(False, f"exclude {hit!r}")
    if include:
        hit = first_match(include, title)
        if hit is None:
            return Verdict(False, "no include pattern matched")
        return Verdict(True, f"include {hit!r}")
    return Verdict(True, None)


def split_label(title: str, rules: list) -> tuple[str | None, str]:
    """(label, rule that matched) for the first rule whose include/exclude the title fits;
    (None, why) when none does. `rules`: objects with label, title_include, title_exclude."""
    for rule in rules:
        verdict = judge(title, rule.title_include, rule.title_exclude)
        if verdict is not None and verdict.on_topic:
            return rule.label, f"{rule.label}: {verdict.rule or 'no exclude matched'}"
    return None, "no label rule matched" if title.strip() else "no title"


def attribute_value(title: str, values: dict[str, list[str]]) -> tuple[str, str | None]:
    """(value, pattern) when exactly one value's patterns match the title; else
    ("unknown", None), also when several values match (a "red and blue" title says neither)."""
    hits = [(value, hit) for value, patterns in values.items()
            if (hit := first_match(patterns, title)) is not None]
    if len(hits) == 1:
        return hits[0]
    return UNKNOWN, None


@dataclass(frozen=True)
class Decision:
    """Where a product goes and why: its label, the manifest's title columns, and whether
    its title rules it out (then it is recorded as rejected and never downloaded)."""

    label: str
    title_verdict: str | None      # 'on_topic' | 'off_topic' | 'unmatched' | None
    title_rule: str | None
    reject_reason: str | None      # 'off_topic_title' | 'no_label_rule' | None


def decide(config: SourcesConfig, found_under: str, title: str | None) -> Decision:
    """The label_rules split (if `found_under` has one), then that label's title rules."""
    title = title or ""
    label, split_rule = found_under, None
    rules = config.label_rules.get(found_under)
    if rules:
        target, split_rule = split_label(title, rules)
        if target is None:
            return Decision(found_under, "unmatched", split_rule, "no_label_rule")
        label = target
    rule = config.title_rules.get(label)
    verdict = judge(title, rule.title_include, rule.title_exclude) if rule else None
    if verdict is None:
        return Decision(label, "on_topic" if split_rule else None, split_rule, None)
    why = "; ".join(part for part in (split_rule, verdict.rule) if part) or None
    if verdict.on_topic:
        return Decision(label, "on_topic", why, None)
    return Decision(label, "off_topic", why,
                    "off_topic_title" if config.off_topic == "reject" else None)


def attributes_of(config: SourcesConfig, title: str | None) -> dict[str, str] | None:
    """attribute -> value (or "unknown") for every attribute in the config; None if none."""
    if not config.attributes:
        return None
    return {name: attribute_value(title or "", values)[0]
            for name, values in config.attributes.items()}


@dataclass
class RulesSummary:
    rows: int = 0
    relabelled: int = 0
    rejected: int = 0          # newly rejected by a title rule
    restored: int = 0          # a rule rejection the current rules no longer make
    collisions: int = 0        # relabel skipped: the target label already has that URL


def apply_rules(manifest: Manifest, config: SourcesConfig) -> RulesSummary:
    """Re-apply title rules, label rules and attribute rules to every listing-found row.

    Rows whose bytes were bad (rejected for a byte reason), failed or blocked keep their
    status and only get the new title columns. A rule rejection that the rules no longer
    make goes back to 'downloaded' (file kept) or 'pending' (fetched by the next crawl). Run
    the dedup pass afterwards: statuses changed. Reviewer decisions are never touched.
    """
    from collector.manifest import RULE_REASONS, STORED_STATUSES

    summary = RulesSummary()
    rows = manifest.query(
        "SELECT id, url, label, found_under, product_title, status, reason, detail, path, "
        "title_verdict, title_rule, attributes FROM images ORDER BY id")
    if not (config.title_rules or config.label_rules or config.attributes) and not any(
            row["title_verdict"] or row["attributes"] or row["reason"] in RULE_REASONS
            for row in rows):
        return RulesSummary(rows=len(rows))      # no rules, none applied before: nothing to do
    with manifest.transaction() as db:
        for row in rows:
            summary.rows += 1
            source = row["found_under"] or row["label"]
            decision = decide(config, source, row["product_title"])
            attributes = attributes_of(config, row["product_title"])
            updates: dict[str, object] = {
                "title_verdict": decision.title_verdict, "title_rule": decision.title_rule,
                "attributes": json.dumps(attributes, sort_keys=True) if attributes else None}
            ruled_out = row["status"] == "rejected" and row["reason"] in RULE_REASONS
            if decision.reject_reason:
                if row["status"] in ("pending", *STORED_STATUSES) or ruled_out:
                    summary.rejected += not ruled_out
                    updates.update(status="rejected", reason=decision.reject_reason,
                                   detail=decision.title_rule)
            elif ruled_out:
                summary.restored += 1
                updates.update(status="downloaded" if row["path"] else "pending",
                               reason=None, detail=None)
            if decision.label != row["label"]:
                clash = db.execute("SELECT 1 FROM images WHERE label = ? AND url = ?",
                                   (decision.label, row["url"])).fetchone()
                if clash:
                    summary.collisions += 1
                else:
                    updates.update(label=decision.label)
                    summary.relabelled += 1
            current = {key: row[key] for key in updates}
            if current == updates:
                continue
            sets = ", ".join(f"{key} = ?" for key in updates)
            db.execute(f"UPDATE images SET {sets} WHERE id = ?", (*updates.values(), row["id"]))
    return summary
