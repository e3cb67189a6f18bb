"""catalog-index: batch pipelines that turn a product catalog into multimodal Annoy indexes."""

__version__ = "0.1.0"
