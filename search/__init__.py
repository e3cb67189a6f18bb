"""Beam-free search over published catalog-index releases.

May import only ``schemas``, ``embedding`` and third-party libraries (never
``pipelines``, ``catalog_index`` or Apache Beam): a search service installs
this package without the batch machinery. tests/test_layers.py enforces it.
"""

from search.ann import ShardSet, exact_search
from search.index import Hit, QueryError, Searcher, Watcher, open_index, read_pointer

__all__ = ["Hit", "QueryError", "Searcher", "ShardSet", "Watcher", "exact_search", "open_index", "read_pointer"]
