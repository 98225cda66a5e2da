"""Review page: look at, fix and approve the collected images in a browser, with a model's help.

Entry points: `collector review` (`app.serve(ReviewConfig)`) and `collector rank`
(`rank.rank(RankConfig)`); both configs live in `config.py`, light enough for `--help`.
"""
