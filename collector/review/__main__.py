"""`python -m collector.review --manifest PATH [--port N] [--no-browser]`."""

from collector.review.app import main

raise SystemExit(main())
