"""An uploaded image read from an HTTP request within limits.

The checks run cheapest first, so that a refusal costs the gateway almost nothing: the
content type (415) and the declared Content-Length (413) from the headers, before a byte
of the body is read; then the body, counted while it streams in (413 as soon as it passes
the limit, never buffered beyond it) and given a deadline (408), so that a slow sender
cannot hold an admission slot for ever.
"""
from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.requests import Request

from decolla.gateway.service import GatewayError

RAW_TYPES = ("image/", "application/octet-stream")
FORM_SLACK = 64 * 1024        # multipart framing around the file is allowed this much


def content_kind(request: Request) -> str:
    """'multipart' or 'raw' from the Content-Type header; 415 for anything else."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return "multipart"
    if ctype.startswith(RAW_TYPES):
        return "raw"
    raise GatewayError(415, "wrong_type", f"content type {ctype or 'missing'!r}: send "
                                          "multipart/form-data with an 'image' file, or image/* bytes")


def check_declared_size(request: Request, limit: int) -> None:
    """413 when the Content-Length header alone says the body is over the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FORM_SLACK:
        raise GatewayError(413, "too_large", f"the upload is {declared} bytes; the limit is {limit} "
                                             f"bytes ({limit / 2**20:g} MiB)")


def _counted(request: Request, limit: int):
    """The request's ASGI receive, refusing (413) as soon as the body passes the limit."""
    seen = 0

    async def receive():
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > limit + FORM_SLACK:
            raise GatewayError(413, "too_large", f"the upload exceeds the limit of {limit} bytes "
                                                 f"({limit / 2**20:g} MiB)")
        return message
    return receive


async def _from_form(request: Request) -> bytes:
    """The file in field 'image' (or the form's only file) of a multipart body; the parser
    keeps a file's bytes past 1 MiB on disk, so the body is held once, as the file read."""
    try:
        form = await request.form(max_files=4, max_fields=16)
    except HTTPException as exc:
        raise GatewayError(400, "bad_form", f"cannot parse the form: {exc.detail}") from exc
    try:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            files = [v for _, v in form.multi_items() if not isinstance(v, str)]
            if not files:
                raise GatewayError(400, "no_image", "the form has no file; send it as field 'image'")
            upload = files[0]
        ptype = (upload.content_type or "").lower()
        if ptype and not ptype.startswith(RAW_TYPES):
            raise GatewayError(415, "wrong_type", f"the uploaded file is {ptype!r}, not an image")
        return await upload.read()
    finally:
        await form.close()


async def _from_body(request: Request) -> bytes:
    return b"".join([part async for part in request.stream()])


async def read_image(request: Request, limit: int, timeout: float) -> bytes:
    """Image bytes from a multipart form or a raw image body (content kind checked already),
    within `timeout` seconds."""
    counted = Request(request.scope, _counted(request, limit))
    read = _from_form if content_kind(request) == "multipart" else _from_body
    try:
        async with asyncio.timeout(timeout):
            return await read(counted)
    except TimeoutError:
        raise GatewayError(408, "upload_timeout",
                           f"the upload did not arrive within {timeout:g} s") from None
