"""What the demo server accepts per request and keeps on disk.

- `RequestSizeLimit`: an ASGI middleware that refuses any request body over a total size (HTTP 413, with a
  sentence saying the limit), counted as it arrives, so many files in one upload cannot add up past it.
- `Uploads`: the files in Gradio's upload folder. A request claims the upload it reads and releases it when it
  ends; RELEASE_DELAY_S later the file is deleted unless a request holds it again or a queued request names it
  (uploads are stored by content, so two clients that send the same image share one file; a file replaced by a
  new upload meanwhile is left to its request).
  A sweep deletes what no request holds and no chat shows once it is older than `max_age` seconds: uploads
  whose request never ran (the client left while it waited) and the pictures Gradio wrote for answers.
  Chats keep their previews in `previews` (a folder the sweep leaves alone); each chat deletes its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 11 * 2**20  # one 10 MB image with its form fields, or a /chat body
FILE_MAX_AGE_S = 600  # files no request holds and no chat shows are deleted after this many seconds
SWEEP_EVERY_S = 30
RELEASE_DELAY_S = 2.0  # an API client joins the queue within this long after it uploads
PREVIEWS = "sparsecut-previews"  # under the upload folder: the chats' previews


class RequestSizeLimit:
    """ASGI middleware: HTTP requests whose body is larger than `max_bytes` get 413 and are not read further."""

    def __init__(self, app, max_bytes: int = MAX_REQUEST_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        received = 0
        refused = False

        async def counted():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    return {"type": "http.disconnect"}  # the app stops reading; nothing more is taken in
            return message

        started = False

        async def watched_send(message):
            nonlocal started
            if refused and not started:
                started = True
                return await self._refuse(send)
            if message["type"] == "http.response.start":
                started = True
            if not refused:
                await send(message)

        await self.app(scope, counted, watched_send)
        if refused and not started:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        limit = f"{self.max_bytes / 2**20:g} MB"
        body = f"The request is larger than the limit of {limit} (one image of at most 10 MB per message).".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})


class Uploads:
    """The upload folder's files: claims by running requests, release, and the sweep (see the module docstring)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        max_age: float = FILE_MAX_AGE_S,
        keep: Callable[[], Iterable] | None = None,
        wanted: Callable[[str], bool] | None = None,
        release_delay: float = RELEASE_DELAY_S,
    ):
        self.folder = Path(folder).resolve()
        self.previews = self.folder / PREVIEWS
        self.max_age = max_age
        self.keep = keep or (lambda: ())  # paths never deleted (the example scenes' copies)
        self.wanted = wanted or (lambda path: False)  # whether a queued request names the path
        self.release_delay = release_delay
        self._claims: Counter[str] = Counter()
        self._inodes: dict[str, int] = {}
        self._released: dict[str, tuple[int | None, float]] = {}  # path -> (inode when claimed, release time)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _inside(self, path: str | None) -> str | None:
        """The resolved path if it is a file in the upload folder (outside the previews), else None."""
        if not path:
            return None
        try:
            resolved = Path(path).resolve()
        except (OSError, ValueError):
            return None
        if self.folder not in resolved.parents or self.previews in resolved.parents:
            return None
        return str(resolved)

    @contextmanager
    def claimed(self, path: str | None) -> Iterator[None]:
        """Hold `path` while a request reads it; deleted afterwards if no other request holds it."""
        own = self._inside(path)
        if own is None:
            yield
            return
        with self._lock:
            self._claims[own] += 1
            if own not in self._inodes:
                try:
                    self._inodes[own] = os.stat(own).st_ino
                except OSError:
                    pass
        try:
            yield
        finally:
            self._release(own)

    def _release(self, path: str) -> None:
        with self._lock:
            self._claims[path] -= 1
            if self._claims[path] > 0:
                return
            del self._claims[path]
            self._released[path] = (self._inodes.pop(path, None), time.monotonic())
        if self.release_delay <= 0:
            self.delete_released()

    def delete_released(self) -> int:
        """Delete the released uploads whose delay has passed, unless held again, named by a queued request,
        replaced by a new upload or kept; returns how many were deleted."""
        now, deleted = time.monotonic(), 0
        with self._lock:
            due = [p for p, (_, at) in self._released.items() if now - at >= self.release_delay]
            entries = {path: self._released.pop(path)[0] for path in due if path not in self._claims}
        if not entries:
            return 0
        kept = {str(Path(p).resolve()) for p in self.keep()}
        for path, inode in entries.items():
            try:
                if path in kept or self.wanted(path) or inode is None or os.stat(path).st_ino != inode:
                    continue
                with self._lock:
                    if path in self._claims:
                        continue
                    _remove(Path(path), self.folder)
                deleted += 1
            except OSError:
                continue
        return deleted

    def sweep(self, max_age: float | None = None) -> int:
        """Delete files older than `max_age` (default: self.max_age) that no request holds and no chat shows;
        returns how many were deleted."""
        max_age = self.max_age if max_age is None else max_age
        cutoff = time.time() - max_age
        kept = {str(Path(p).resolve()) for p in self.keep()}
        deleted = 0
        with self._lock:
            held = set(self._claims) | set(self._released)
        for path in _files(self.folder):
            if self.previews in path.parents or str(path) in held or str(path) in kept:
                continue
            try:
                if path.lstat().st_ctime < cutoff:
                    _remove(path, self.folder)
                    deleted += 1
            except OSError:
                continue
        return deleted

    def start(self, every: float | None = None) -> None:
        """Sweep every `every` seconds (default: SWEEP_EVERY_S, or half of max_age if less) in a daemon thread
        until `stop()`."""
        every = every or max(1.0, min(SWEEP_EVERY_S, self.max_age / 2))

        def run() -> None:
            last_sweep = time.monotonic()
            while not self._stop.wait(min(every, max(0.2, self.release_delay / 2))):
                try:
                    self.delete_released()
                    if time.monotonic() - last_sweep >= every:
                        self.sweep()
                        last_sweep = time.monotonic()
                except Exception:  # retried at the next round
                    logger.exception("Cleaning the upload folder failed")

        self._thread = threading.Thread(target=run, name="sparsecut-uploads", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def _files(folder: Path) -> list[Path]:
    found = []
    for root, _, names in os.walk(folder):
        found.extend(Path(root) / name for name in names)
    return found


def _remove(path: Path, folder: Path) -> None:
    """Delete a file and, if that leaves it empty, the per-upload folder Gradio made for it (not `folder`)."""
    path.unlink(missing_ok=True)
    if path.parent != folder:
        try:
            path.parent.rmdir()
        except OSError:
            pass


def count_files(folder: str | os.PathLike) -> dict[str, int]:
    """Files in an upload folder: the chats' previews and everything else."""
    folder = Path(folder).resolve()
    files = _files(folder) if folder.is_dir() else []
    previews = sum(1 for path in files if (folder / PREVIEWS) in path.parents)
    return {"previews": previews, "other": len(files) - previews}
