"""The HTTP contract of ``catalog-index serve``: limits, the request and response models (the OpenAPI
schema), JSON error bodies, and the checks a request passes before any search runs.

Every bad request is a 4xx with ``{"error": "..."}``:

    400  malformed JSON, a body that is not a JSON object
    413  request body or uploaded image over 10 MB, image over the index's pixel limit
    415  an upload that is not a JPEG, PNG, GIF, BMP or WebP image
    422  a wrong type, k outside 1..1000, blank or over-long text, bad base64
    503  no index loaded
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Optional

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

MIN_K, MAX_K, DEFAULT_K = 1, 1000, 10
MAX_TEXT_CHARS = 2000
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Bodies are bounded before they are read whole: a base64 image is 4/3 of its bytes, and multipart
# framing plus a small form field fit in the slack. Anything else (GET, health) needs no body at all.
_SLACK = 64 * 1024
BODY_LIMITS = {"/search": (MAX_UPLOAD_BYTES + 2) // 3 * 4 + _SLACK, "/search/image": MAX_UPLOAD_BYTES + _SLACK}
_DEFAULT_BODY_LIMIT = _SLACK
IMAGE_FORMATS = "JPEG, PNG, GIF, BMP or WebP"

K_DESCRIPTION = f"number of results, {MIN_K} to {MAX_K} (default {DEFAULT_K})"
TEXT_DESCRIPTION = f"query text, not blank, at most {MAX_TEXT_CHARS} characters"


# --------------------------------------------------------------------------- models (the OpenAPI schema)

class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong with the request, in one line")


class Result(BaseModel):
    item_id: str
    score: float = Field(description="similarity (higher is closer)")
    shard: int = Field(description="the shard the item lives in")
    title: Optional[str] = None


class SearchResponse(BaseModel):
    version: str = Field(description="the index version that answered")
    release: str = Field(description="the release of that version that answered")
    results: list[Result]


class SearchRequest(BaseModel):
    """A text query, an image query, or both fused. At least one of ``text`` and ``image``."""

    model_config = ConfigDict(extra="forbid")

    text: Optional[StrictStr] = Field(None, max_length=MAX_TEXT_CHARS, description=TEXT_DESCRIPTION)
    image: Optional[StrictStr] = Field(
        None, description=f"base64 of a {IMAGE_FORMATS} file (a data: URL prefix is allowed), at most "
                          f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MB decoded and at most the index's "
                          f"max_image_pixels pixels")
    k: StrictInt = Field(DEFAULT_K, ge=MIN_K, le=MAX_K, description=K_DESCRIPTION)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value):
        if value is not None and not value.strip():
            raise ValueError("text is blank")
        return value

    @model_validator(mode="after")
    def _one_query(self):
        if self.text is None and self.image is None:
            raise ValueError('give "text", "image" or both')
        return self


class VersionResponse(BaseModel):
    version: str
    release: str
    snapshot: Optional[str] = None
    created_at: Optional[str] = None
    counts: dict[str, Any] = Field(description="the manifest's counts (read, indexed, rejected, degraded...)")
    loaded_at: str = Field(description="when this process loaded the release")


class HealthResponse(BaseModel):
    status: str
    version: str
    release: str


_ERRORS_DOC = {
    400: {"model": ErrorBody, "description": "malformed JSON or a body that is not a JSON object"},
    413: {"model": ErrorBody, "description": "request or image over 10 MB, or image over the pixel limit"},
    415: {"model": ErrorBody, "description": f"the upload is not a {IMAGE_FORMATS} image"},
    422: {"model": ErrorBody, "description": "a wrong type or a value out of its limits (k, text, base64)"},
    503: {"model": ErrorBody, "description": "no index is loaded"},
}


def doc(*codes):
    return {code: _ERRORS_DOC[code] for code in codes}


# --------------------------------------------------------------------------- errors


def _where(loc) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("query", "body", "path", "header"):
        kind, rest = parts[0], parts[1:]
        if kind == "body" and not rest:
            return "request body"
        return f"{'query parameter' if kind == 'query' else 'field'} {'.'.join(rest)}" if rest else kind
    return ".".join(parts) or "request"


def validation_message(errors) -> tuple[int, str]:
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error", "")
            return 400, f"malformed JSON body: {detail} at position {e['loc'][-1]}" if detail else "malformed JSON"
    for e in errors:
        if e.get("type") == "model_attributes_type" or (e.get("type") == "dict_type" and tuple(e["loc"]) == ("body",)):
            return 400, "the request body must be a JSON object such as {\"text\": \"red shoes\", \"k\": 10}"
    messages = []
    for e in errors[:3]:
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        messages.append(f"{_where(e.get('loc', ()))}: {msg}")
    return 422, "; ".join(messages)


def error_response(status, message):
    return JSONResponse({"error": message}, status_code=status)


# --------------------------------------------------------------------------- images


def check_upload(data: bytes, max_pixels: int) -> None:
    """Size, format and declared canvas from the header only (the pipeline's own check), before decoding."""
    from embedding import images

    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"image is {len(data)} bytes, over the {MAX_UPLOAD_BYTES}-byte limit")
    if not data:
        raise HTTPException(415, f"the upload is empty, not a {IMAGE_FORMATS} image")
    try:
        images.check_image(data, max_pixels)
    except images.ImageTooLargeError as exc:
        raise HTTPException(413, f"{exc} of this index") from None
    except images.ImageDecodeError as exc:
        raise HTTPException(415, f"the upload is not a readable {IMAGE_FORMATS} image ({exc})") from None


def status_of(exc) -> int:
    """The HTTP status of a query that could not be embedded, by the kind of error (never its wording)."""
    from embedding import images

    if isinstance(exc, images.ImageTooLargeError):
        return 413
    if isinstance(exc, images.ImageDecodeError):
        return 415
    return 422


def max_pixels_of(searcher) -> int:
    from embedding import images

    value = ((searcher.manifest or {}).get("options") or {}).get("max_image_pixels")
    return value if isinstance(value, int) and value > 0 else images.DEFAULT_MAX_PIXELS


def decode_base64(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > BODY_LIMITS["/search"]:
        raise HTTPException(413, f"image is over the {MAX_UPLOAD_BYTES}-byte limit")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "field image: not valid base64") from None


class BodyLimitMiddleware:
    """Refuses a body over its endpoint's limit with 413: by Content-Length before reading, and by
    counting while it streams in (chunked uploads), so an oversized body is never held whole."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = BODY_LIMITS.get(scope["path"], _DEFAULT_BODY_LIMIT)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await too_large(limit)(scope, receive, send)
            return
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI re-raises an HTTPException met while reading the body; the app's
                    # handler turns it into the JSON 413.
                    raise HTTPException(413, _too_large_message(limit))
            return message

        await self.app(scope, bounded_receive, send)


def _too_large_message(limit):
    return f"request body over the {limit} byte limit of this endpoint (images: at most {MAX_UPLOAD_BYTES} bytes)"


def too_large(limit):
    return JSONResponse({"error": _too_large_message(limit)}, status_code=413, headers={"Connection": "close"})
