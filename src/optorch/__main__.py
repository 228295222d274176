"""``python -m optorch verify`` / ``python -m optorch compare``: the same command line as the ``optorch``
console script."""

from .tools.cli import main

raise SystemExit(main())
