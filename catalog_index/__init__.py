"""catalog-index: batch pipelines that turn a product catalog into multimodal Annoy indexes."""

from schemas.layout import TOOL_VERSION as __version__  # noqa: F401 - one place owns the version
