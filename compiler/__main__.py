"""``python -m ember``: the CLI."""

from .cli import main

raise SystemExit(main())
