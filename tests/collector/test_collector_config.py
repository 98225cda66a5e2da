"""Sources YAML: the shipped examples load; bad files fail with the bad field named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from collector.config import ConfigError, load_sources

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "collector" / "examples"

GOOD = {
    "categories": {"dress": ["http://127.0.0.1:8765/search?q=dress"]},
    "sites": {"127.0.0.1:8765": {"card": "div.product-card", "id_attr": "data-product-id"}},
}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "sources.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data) -> str:
    with pytest.raises(ConfigError) as info:
        load_sources(write(tmp_path, data))
    return str(info.value)


@pytest.mark.parametrize("name", ["sources.yaml", "amazon_like.yaml", "amazon_search.yaml",
                                  "flipkart_search.yaml"])
def test_collector_examples_load(name):
    config = load_sources(EXAMPLES / name)
    assert config.categories and config.sites
    assert config.output_dir.is_absolute() and config.output_dir.parent == EXAMPLES


def test_collector_output_dir_is_relative_to_the_file(tmp_path):
    config = load_sources(write(tmp_path, {**GOOD, "output_dir": "out"}))
    assert config.output_dir == (tmp_path / "out").resolve()
    assert config.politeness.obey_robots is True          # polite by default


@pytest.mark.parametrize("patch, field, words", [
    ({"politness": {"concurrency_per_host": 2}}, "politness", "unknown field"),
    ({"politeness": {"concurrency_per_host": 0}}, "politeness.concurrency_per_host",
     "greater than or equal to 1"),
    ({"politeness": {"requests_per_second_per_host": "fast"}},
     "politeness.requests_per_second_per_host", "valid number"),
    ({"sites": {"127.0.0.1:8765": {"card": "div.card >"}}}, "sites.127.0.0.1:8765.card",
     "invalid CSS selector"),
    ({"sites": {"127.0.0.1:8765": {"title": "h3"}}}, "sites.127.0.0.1:8765.card",
     "Field required"),
    ({"categories": {"dress": ["ftp://shop/x"]}}, "categories", "not an http(s) URL"),
    ({"categories": {"dress": []}}, "categories", "no start URLs"),
    ({"categories": {"../etc": ["http://a/b"]}}, "categories", "folder name"),
    ({"url_lists": {"../x": "urls.txt"}}, "url_lists", "folder name"),
    ({"url_lists": {"a\\b": "urls.txt"}}, "url_lists", "folder name"),
    ({"limits": {"max_images_per_label": -5}}, "limits.max_images_per_label", ">= 1"),
    ({"dedup": {"hamming_threshold": 99}}, "dedup.hamming_threshold",
     "less than or equal to 32"),
])
def test_collector_bad_config_names_the_field(tmp_path, patch, field, words):
    message = error_of(tmp_path, {**GOOD, **patch})
    assert f"  {field}: " in message, message
    assert words.replace(">= 1", "greater than or equal to 1") in message, message
    assert str(tmp_path / "sources.yaml") in message


def test_collector_host_without_profile(tmp_path):
    data = {"categories": {"a": ["http://one.test/s"], "b": ["http://three.test/s"]},
            "sites": {"one.test": {"card": "div"}, "two.test": {"card": "li"}}}
    message = error_of(tmp_path, data)
    assert "categories.b: no site profile for host 'three.test'" in message


def test_collector_unreadable_files(tmp_path):
    assert "not valid YAML" in error_of(tmp_path, "categories: [unclosed\n")
    assert "expected a mapping" in error_of(tmp_path, "- just\n- a list\n")
    with pytest.raises(ConfigError, match="no such file"):
        load_sources(tmp_path / "missing.yaml")


def test_collector_docs_profile_is_the_shipped_example():
    """The worked Amazon-like profile in docs/collect.md is the file the tests load."""
    manual = (REPO / "docs" / "collect.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", manual, flags=re.DOTALL)
    shipped = yaml.safe_load((EXAMPLES / "amazon_like.yaml").read_text())
    assert any(yaml.safe_load(block) == shipped for block in blocks)
