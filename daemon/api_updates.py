"""Admin API for signed updates: upload or point at a bundle, watch progress, roll back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from pathlib import Path

from aiohttp import web

from daemon.bodies import read_json
from daemon.middleware import PRINCIPAL
from daemon.schemas import BUNDLE_PATH_REQUEST
from daemon.services import SERVICES
from runtime.errors import PayloadTooLarge

log = logging.getLogger(__name__)

TAR_TYPES = ("application/x-tar", "application/tar")


async def get_bundles(request: web.Request) -> web.Response:
    """GET /admin/bundles: installed release, import progress (phase, bytes, files), last result."""
    return web.json_response(request.app[SERVICES].updates.status())


async def post_bundle(request: web.Request) -> web.Response:
    """POST /admin/bundles: a bundle as a tar body (Content-Type application/x-tar), or JSON
    {"path": DIR} naming a bundle directory on the box (e.g. a mounted stick). Same code path as USB."""
    s = request.app[SERVICES]
    who = request[PRINCIPAL].name
    ctype = request.content_type
    if ctype in TAR_TYPES:
        limit = s.settings.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"bundle upload is {request.content_length} bytes; the limit is {limit}")
        s.store.ensure()
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".tar", dir=s.store.staging_dir)
        tmp = Path(name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for chunk in request.content.iter_chunked(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"bundle upload is over the limit of {limit} bytes")
                    out.write(chunk)
            await s.db.run(s.db.audit, who, "bundle.upload", "ok", bytes=size)
            result = await s.updates.run_import(tmp, tar=True)
        finally:
            await asyncio.to_thread(_remove, tmp)
    else:  # anything but a tar must be JSON {"path": ...}: 415 otherwise, 400 naming the field if bad
        body = await read_json(request, BUNDLE_PATH_REQUEST)
        await s.db.run(s.db.audit, who, "bundle.import_path", "ok", path=body["path"])
        result = await s.updates.run_import(body["path"])
    return web.json_response(result.to_json())


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def post_rollback(request: web.Request) -> web.Response:
    """POST /admin/rollback: return to the previous release."""
    s = request.app[SERVICES]
    rel = await s.updates.rollback()
    await s.db.run(s.db.audit, request[PRINCIPAL].name, "release.rollback", "ok", to=rel.sequence)
    return web.json_response({"current": {"sequence": rel.sequence, "version": rel.version}})
