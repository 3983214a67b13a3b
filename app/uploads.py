"""The demo's upload folder: private to the server's user, and bounded in size.

Gradio stores what clients post to its upload route (``POST /gradio_api/upload``: the browser's attachments,
gradio_client's ``handle_file``, or any script) as ``<GRADIO_TEMP_DIR>/<sha256 of the content>/<file name>``,
each file at most ``max_file_size`` (a ``launch`` setting), and deletes them only on its ``delete_cache`` schedule
(app/ui.py: files older than an hour). Nothing bounds how many there are in the meantime: forty posts of a megabyte
are forty megabytes kept for that hour, and a loop of posts fills the disk. Gradio has no setting for the folder's
total, so ``UploadFolderGuard``, an ASGI middleware handed to Gradio's FastAPI app, adds one: after every POST (an
upload, or an event whose payload Gradio saved as a file) it deletes the oldest files beyond ``max_bytes`` in all or
``max_files`` in number, and gives every file mode 0600 and every folder 0700 (Gradio copies the examples' files
with the mode of their source, 0644). What the folder held when the server started (the examples Gradio cached while
the app was built) is never deleted. A conversation whose image was deleted this way gets the chat's "attach it
again" message, as after Gradio's own hourly sweep.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

import anyio

MAX_CACHE_BYTES = 256 * 2**20
"""Bytes of uploaded and cached files kept at most (25 uploads at the default 10 MB limit); the oldest go first."""
MAX_CACHE_FILES = 1000
"""Uploaded and cached files kept at most: one post may carry many tiny files, which the byte cap would not bound."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def private_cache_dir() -> Path:
    """A new folder only this user may enter (mode 0700, from ``mkdtemp``) inside Gradio's temp folder, made the
    process's ``GRADIO_TEMP_DIR``: Gradio reads it when it builds components, creates the server and stores an upload.
    """
    parent = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="llama-adapter-demo-", dir=parent))
    os.environ["GRADIO_TEMP_DIR"] = str(path)
    return path


def files_under(folder: Path) -> list[Path]:
    """The files below ``folder``'s subfolders (Gradio's ``<hash>/<name>``); a file directly in ``folder`` is an
    upload still being received (Gradio's temporary file, renamed into its subfolder once complete)."""
    return [p for p in folder.glob("*/**/*") if p.is_file() and not p.is_symlink()]


class UploadFolderGuard:
    """ASGI middleware bounding ``folder`` at every POST request, after its handler and before its response: the
    oldest files beyond ``max_bytes`` in all or ``max_files`` in number are deleted (``keep``, the files there when
    the server started, never are), every file is made mode 0600 and every folder 0700. The work runs in a worker
    thread, one request at a time."""

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        *,
        folder: str | Path,
        keep: Iterable[Path] = (),
        max_bytes: int = MAX_CACHE_BYTES,
        max_files: int = MAX_CACHE_FILES,
    ) -> None:
        if max_bytes < 1 or max_files < 1:
            raise ValueError(f"the upload folder's caps must be positive, got {max_bytes} bytes, {max_files} files")
        self.app = app
        self.folder = Path(folder)
        self.keep = frozenset(keep)
        self.max_bytes, self.max_files = max_bytes, max_files
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        tidied = False

        async def send_when_tidy(message: Message) -> None:
            """The response, once the request's files are in place and the caps hold: a client that got the reply
            finds the folder bounded."""
            nonlocal tidied
            if not tidied and message["type"] == "http.response.start":
                tidied = True
                await anyio.to_thread.run_sync(self.tidy)
            await send(message)

        await self.app(scope, receive, send_when_tidy)

    def tidy(self) -> list[Path]:
        """Enforce the caps and the modes now; returns the files deleted, oldest first."""
        with self._lock:
            deleted = self._evict()
            secure(self.folder)
        return deleted

    def _evict(self) -> list[Path]:
        sized = []
        for path in files_under(self.folder):
            if path in self.keep:
                continue
            try:
                info = path.stat()
            except FileNotFoundError:  # Gradio's own sweep, or a request that deleted it meanwhile
                continue
            sized.append((info.st_mtime, path, info.st_size))
        sized.sort()
        total, count = sum(size for _, _, size in sized), len(sized)
        deleted = []
        for _, path, size in sized:
            if total <= self.max_bytes and count <= self.max_files:
                break
            path.unlink(missing_ok=True)
            deleted.append(path)
            total, count = total - size, count - 1
            try:
                path.parent.rmdir()  # Gradio's <hash> folder, once empty
            except OSError:
                pass
        return deleted


def secure(folder: Path) -> None:
    """Mode 0700 for ``folder`` and every folder below it, 0600 for every file (links are left alone)."""
    for path in [folder, *folder.rglob("*")]:
        try:
            info = path.lstat()
            if stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) != 0o700:
                path.chmod(0o700)
            elif stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) != 0o600:
                path.chmod(0o600)
        except FileNotFoundError:
            continue
