"""`python -m collector.review ...`: the same as `collector review ...`."""

import sys

from collector.cli import main

sys.exit(main(["review", *sys.argv[1:]]))
