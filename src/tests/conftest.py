"""``pytest --full`` also runs what ``optorch verify --full`` runs: every flag combination on every path,
the compiled engine included (long). Without it the suite runs what ``optorch verify`` runs by default."""


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="also run the whole verification grid (optorch verify --full)")
