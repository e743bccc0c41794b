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
from sync.copy import DISK_FULL_ERRNOS
from sync.errors import ImportFailed, ImportInProgress, InsufficientSpace
from sync.recovery import hold_entry

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
        uploads = s.updates.imports.uploads
        if uploads.locked() or s.updates.manager.busy:  # refused before a byte of it is written
            raise ImportInProgress("another bundle upload or import is running; try again when it ends")
        async with uploads:
            tmp, size = await _receive(request, s.store.staging_dir, limit)
            try:
                await s.db.run(s.db.audit, who, "bundle.upload", "ok", bytes=size)
                result = await s.updates.imports.run_import(tmp.path, tar=True)
            finally:
                await asyncio.to_thread(tmp.close)
    else:  # anything but a tar must be JSON {"path": ...}: 415 otherwise, 400 naming the field if bad
        body = await read_json(request, BUNDLE_PATH_REQUEST)  # the schema /openapi.json documents
        await s.db.run(s.db.audit, who, "bundle.import_path", "ok", path=body["path"])
        result = await s.updates.imports.run_import(body["path"])
    return web.json_response(result.to_json())


class _Upload:
    """An upload being received in staging/upload-*.tar, held (flock) so another process's
    start-up clean-up leaves it alone; close() removes it."""

    def __init__(self, staging: Path) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".tar", dir=staging)
        self.fd, self.path = fd, Path(name)
        self.hold = contextlib.ExitStack()
        self.hold.enter_context(hold_entry(self.path))

    def write(self, chunk: bytes) -> None:
        """Append a chunk."""
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        """Close, release and remove the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.hold.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def _receive(request: web.Request, staging: Path, limit: int) -> tuple[_Upload, int]:
    """Stream the body into staging (writes off the event loop), capped at `limit` bytes."""
    up = await asyncio.to_thread(_Upload, staging)
    size = 0
    try:
        async for chunk in request.content.iter_chunked(1 << 20):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"bundle upload is over the limit of {limit} bytes")
            await asyncio.to_thread(up.write, chunk)
    except OSError as e:
        await asyncio.to_thread(up.close)
        if e.errno in DISK_FULL_ERRNOS:
            raise InsufficientSpace("the store's disk filled up while receiving the bundle") from e
        raise ImportFailed("the bundle upload could not be stored", code="io_error") from e
    except BaseException:
        await asyncio.to_thread(up.close)
        raise
    return up, size


async def post_rollback(request: web.Request) -> web.Response:
    """POST /admin/rollback: return to the previous release."""
    s = request.app[SERVICES]
    rel = await s.updates.imports.rollback()
    await s.db.run(s.db.audit, request[PRINCIPAL].name, "release.rollback", "ok", to=rel.sequence)
    return web.json_response({"current": {"sequence": rel.sequence, "version": rel.version}})
