"""Resumable HTTP download with progress callback and sha256 verification.

Data arrives in ``<dest>.part``; an interrupted download resumes with an HTTP ``Range`` request
(servers that ignore it restart from zero). The file takes its final name only once complete and,
when a checksum is known, verified; a checksum mismatch deletes the data.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointError

log = logging.getLogger(__name__)

#: ``progress(bytes_done, bytes_total_or_None)``
ProgressFn = Callable[[int, int | None], None]
CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    size: int | None = None,
    progress: ProgressFn | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verifying ``sha256`` when given.

    An existing ``dest`` is reused (after verification when ``sha256`` is known).

    Args:
        url: HTTP(S) URL of the file.
        dest: Final path.
        sha256: Expected hex digest, or ``None`` when no checksum is known.
        size: Expected size in bytes, or ``None`` when unknown.
        progress: Called with ``(done, total)`` as bytes arrive.
        timeout: Socket timeout in seconds.

    Returns:
        ``dest``.

    Raises:
        CheckpointError: on network errors (partial data kept for resuming), a web page served
            instead of the file, a truncated transfer, or a size or checksum mismatch (data deleted).
    """
    final = Path(dest)
    part = final.with_name(final.name + ".part")
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_file():
        _verify(final, sha256, size, url)
        return final
    done = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            ctype = resp.headers.get("Content-Type", "")
            if ctype.startswith("text/html"):
                raise CheckpointError(
                    f"{url}: the server sent a web page instead of the file (login or confirmation page?); "
                    f"download it in a browser and pass the file path instead"
                )
            if done and resp.status != 206:
                log.info("%s: server ignored the resume request; restarting", url)
                done = 0
            length = resp.headers.get("Content-Length")
            total = done + int(length) if length is not None else None
            if done:
                log.info("resuming %s at byte %d", url, done)
            with open(part, "ab" if done else "wb") as f:
                if progress:
                    progress(done, total)
                for block in iter(lambda: resp.read(CHUNK), b""):
                    f.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not done:  # 416: the partial file already holds everything
            raise CheckpointError(f"{url}: download failed (HTTP {e.code} {e.reason})") from None
        total = done
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise CheckpointError(f"{url}: download failed ({reason}); partial data kept in {part}") from None
    if total is not None and done < total:
        raise CheckpointError(
            f"{url}: transfer ended at {done} of {total} bytes; run again to resume ({part})"
        )
    _verify(part, sha256, size, url)
    os.replace(part, final)
    return final


def _verify(path: Path, sha256: str | None, size: int | None, url: str) -> None:
    if size is not None and path.stat().st_size != size:
        got_size = path.stat().st_size
        path.unlink()
        raise CheckpointError(f"{path}: size mismatch for {url} (expected {size} bytes, got {got_size}); file deleted")
    if sha256 is None:
        return
    got = sha256_file(path)
    if got.lower() != sha256.lower():
        path.unlink()
        raise CheckpointError(
            f"{path}: sha256 mismatch for {url} (expected {sha256[:12]}..., got {got[:12]}...); file deleted"
        )
