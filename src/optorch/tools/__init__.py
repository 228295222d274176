"""The top layer: what checks, compares and documents optorch, and its command line.

``verify`` (replaying the originals' recordings and the references, with their adapters),
``verify_distributed``, ``recorded``, ``compare`` (training runs side by side), ``docgen`` (the config
reference from the pydantic fields) and ``cli`` (``optorch verify`` / ``optorch compare``).
"""
