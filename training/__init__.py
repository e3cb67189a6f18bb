"""Learning the fusion from logged clicks: the two towers, the retrieval loss, evaluation and export.

Beam-free (tests/test_layers.py): it may import only ``schemas``, ``embedding``
and third-party libraries. The Beam preprocessing and the ``train`` command that
drive it live in ``pipelines/``.
"""
