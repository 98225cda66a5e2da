"""The demo shop's colour attribute: titles carry the shipped colour word, the sources file it
writes turns that word back into the colour, and photos without one stay 'unknown'."""

from __future__ import annotations

import yaml

from collector.config import SourcesConfig
from collector.demo_shop import DemoShop, load_colours, photo_colour, write_sources
from collector.rules import attributes_of


def test_demo_shop_titles_and_sources_carry_the_colour_attribute(demo_catalog, tmp_path):
    colours = load_colours(demo_catalog)
    assert len(set(colours.values())) >= 3 and len(colours) < 300   # some photos have none
    shop = DemoShop(demo_catalog, faults=set())
    path = write_sources(shop, tmp_path / "sources.yaml", str(tmp_path / "out"))
    config = SourcesConfig.model_validate(yaml.safe_load(path.read_text()))
    assert set(config.attributes["colour"]) == set(colours.values())
    seen = {"known": 0, "unknown": 0}
    for product in shop.plan.products.values():
        expected = colours.get(f"{product.label}/{product.source.name}", "unknown")
        assert attributes_of(config, product.title) == {"colour": expected}, product.title
        seen["unknown" if expected == "unknown" else "known"] += 1
    assert seen["known"] > seen["unknown"] > 0
    # The shipped file is what the heuristic says (it is derived, not hand-made).
    key, colour = min(colours.items())
    assert photo_colour(demo_catalog / key) == colour
