"""``python -m optorch verify``: the same command line as the ``optorch`` console script."""

from .cli import main

raise SystemExit(main())
