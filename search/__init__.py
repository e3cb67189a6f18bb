"""Beam-free search over published catalog-index releases.

May import only ``schemas``, ``embedding`` and third-party libraries (never
``pipelines``, ``catalog_index`` or Apache Beam): a search service installs
this package without the batch machinery. tests/test_layers.py enforces it.
"""

from search.ann import ShardSet, exact_search
from search.embedder import QueryError
from search.index import Hit, Searcher, open_index
from search.release import read_pointer
from search.watcher import Watcher

__all__ = ["Hit", "QueryError", "Searcher", "ShardSet", "Watcher", "exact_search", "open_index", "read_pointer"]
