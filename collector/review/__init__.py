"""Review page: look at, fix and approve the collected images in a browser, with a model's help.

Entry points: `collector.review.app.main(argv)` (the `collector review` command and
`python -m collector.review`), `collector.review.rank.main(argv)` (model-assisted ranking).
"""
