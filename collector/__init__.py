"""Collector: shop listing pages -> clean, deduplicated, labelled image set -> split ImageFolder."""
