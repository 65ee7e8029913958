"""Resumable, sha256-checked HTTP downloads: checkpoints (``omi-node download``) and data shards.

A file goes into ``<name>.part``; an interrupted transfer continues with an HTTP ``Range`` request from the bytes
already there. A file fetched in one go is hashed while written, a resumed one once it is whole; a file whose size
or sha256 differs from what was promised is renamed ``<name>.corrupt`` and refused; a verified file gets its real
name.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from omi.protos.files import sha256_file

CHUNK = 1 << 20  # bytes per read
HTTP_TIMEOUT = 30.0  # seconds without data before a request fails


class DownloadError(RuntimeError):
    """A download that failed or was refused; ``exit_code``: 1 refused (bad signature or hash), 2 bad input,
    3 coordinator unreachable or transfer interrupted (run again to resume), 4 not found."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def open_url(url: str, headers: dict | None = None):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=HTTP_TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise DownloadError(f"not found: {url}", 4) from None
        raise DownloadError(f"{url}: HTTP {e.code}", 3) from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"cannot reach {url}: {getattr(e, 'reason', e)}", 3) from None


def fetch_file(url: str, target: Path, size: int, sha256: str, advance) -> int:
    """Download ``url`` into ``target`` through ``target.part`` (resumed if present); returns bytes fetched."""
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    digest = hashlib.sha256()  # of the bytes this call writes
    advance(have)
    fetched = 0
    if have < size:
        response = open_url(url, {"Range": f"bytes={have}-"} if have else None)
        with response:
            if have and response.status != 206:  # the server ignored the range: start over
                advance(-have)
                have = 0
            with open(part, "ab" if have else "wb") as f:
                try:
                    # never more than the signed size: a server that sends more fills no disk
                    while (remaining := size - have - fetched) > 0 and (chunk := response.read(min(CHUNK, remaining))):
                        f.write(chunk)
                        digest.update(chunk)
                        fetched += len(chunk)
                        advance(len(chunk))
                    longer = remaining <= 0 and bool(response.read(1))
                except (OSError, http.client.HTTPException) as e:
                    raise DownloadError(f"transfer of {target.name} interrupted after {have + fetched} of {size} "
                                        f"bytes ({e}); run the same command again to resume", 3) from None
                finally:
                    f.flush()
                    os.fsync(f.fileno())
            if longer:
                corrupt = target.with_name(target.name + ".corrupt")
                os.replace(part, corrupt)
                raise DownloadError(f"refused: the server sends more of {target.name} than the {size} bytes the "
                                    f"signed manifest names (the first {size} kept as {corrupt.name})")
    got = part.stat().st_size
    if got < size:  # the connection ended early without an error: keep the part to resume from
        raise DownloadError(f"transfer of {target.name} ended after {got} of {size} bytes; run the same command "
                            "again to resume", 3)
    actual = sha256_file(part) if have else digest.hexdigest()  # a resumed part holds bytes of an earlier call
    if got != size or actual != sha256:
        corrupt = target.with_name(target.name + ".corrupt")
        os.replace(part, corrupt)
        raise DownloadError(f"refused: {target.name} does not match the signed manifest (sha256 "
                            f"{actual[:16]}… instead of {sha256[:16]}…, {got} bytes); kept as "
                            f"{corrupt.name}")
    os.replace(part, target)
    return fetched
