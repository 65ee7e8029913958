"""A prepared data set fetched over HTTP into this machine's cache: where it lies, its manifest, its files, eviction.

A node opening a ``manifest:URL[#sha256:PIN]`` data set (:class:`~omi.models.latent_source.LatentShardSource`)
fetches the manifest, then only the files it reads: resumably and sha256-checked (:mod:`omi.models.fetch`), from the
coordinator or a mirror the manifest names, with retries, into a folder of its own under :func:`data_cache_dir`,
which is kept under a size bound (least recently used shards go first).
"""

import hashlib
import logging
import os
import time
from pathlib import Path

from omi.models.data import DataSourceError
from omi.models.fetch import DownloadError, fetch_file, open_url
from omi.protos.data_ref import DataRef
from omi.protos.dataset import DATASET_MANIFEST_NAME

logger = logging.getLogger(__name__)

DATA_CACHE_BYTES = 10 << 30  # default bound of a node's cache of fetched shards
FETCH_ATTEMPTS = 3  # tries over the coordinator and the mirrors before a shard is given up
FETCH_BACKOFF = 1.0  # seconds before the second try; doubled each time
MAX_MANIFEST_BYTES = 64 << 20


def cache_root() -> Path:
    """The project's cache folder: ``$OMI_SWARM_CACHE``, else ``~/.cache/omi-swarm``."""
    return Path(os.environ.get("OMI_SWARM_CACHE", Path.home() / ".cache" / "omi-swarm"))


def data_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where fetched data sets are cached: ``cache_dir``, else ``data/`` under :func:`cache_root`."""
    return Path(cache_dir) if cache_dir is not None else cache_root() / "data"


def url_cache_folder(url: str, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of the data set at ``url`` (its base URL, no trailing slash)."""
    return data_cache_dir(cache_dir) / hashlib.sha256(url.encode()).hexdigest()[:16]


def fetched_manifest(ref: DataRef, cache_dir: str | Path | None = None) -> tuple[str, bytes] | None:
    """``(base URL, manifest bytes)`` of the ``manifest:URL[#sha256:PIN]`` data set ``ref`` as this machine fetched
    it last (opening a :class:`~omi.models.latent_source.LatentShardSource` caches it); None if never fetched, if it
    is not the pinned one, or if ``ref`` is no URL. Reads nothing over the network."""
    if ref.url is None:
        return None
    try:
        data = (url_cache_folder(ref.url, cache_dir) / DATASET_MANIFEST_NAME).read_bytes()
    except OSError:
        return None
    if ref.pinned_sha256 and hashlib.sha256(data).hexdigest() != ref.pinned_sha256:
        return None
    return ref.url, data


def fetch_manifest(url: str, folder: Path) -> bytes:
    """The ``manifest.json`` of the data set at ``url``, fetched with retries; the copy in its cache ``folder`` if
    ``url`` cannot be reached."""
    last = None
    for attempt in range(FETCH_ATTEMPTS):
        try:
            with open_url(f"{url}/{DATASET_MANIFEST_NAME}") as response:
                data = response.read(MAX_MANIFEST_BYTES + 1)
            if len(data) > MAX_MANIFEST_BYTES:
                raise DataSourceError(f"{url}/{DATASET_MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes")
            return data
        except DownloadError as e:
            last = e
            if e.exit_code == 4:
                break
            time.sleep(FETCH_BACKOFF * 2**attempt)
    cached = folder / DATASET_MANIFEST_NAME
    if cached.is_file():
        logger.warning("%s unreachable (%s): using the manifest fetched before", url, last)
        return cached.read_bytes()
    raise DataSourceError(f"cannot fetch the data set's manifest from {url}: {last}")


def fetch_to_cache(ref, bases: list[str], folder: Path) -> int:
    """Download one file of a data set into its cache ``folder`` (resumed, sha256-checked), from the first of
    ``bases`` (the coordinator, then the manifest's mirrors) that serves it, retrying; returns the bytes downloaded."""
    target = folder / ref.file
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for attempt in range(FETCH_ATTEMPTS):
        for base in bases:
            try:
                fetched = fetch_file(f"{base}/{ref.file}", target, ref.bytes, ref.sha256, lambda n: None)
                logger.info("fetched %s from %s (%d bytes)", ref.file, base, ref.bytes)
                return fetched
            except DownloadError as e:
                errors.append(f"{base}: {e}")
                target.with_name(target.name + ".corrupt").unlink(missing_ok=True)
        time.sleep(FETCH_BACKOFF * 2**attempt)
    raise DataSourceError(f"cannot fetch {ref.file} ({FETCH_ATTEMPTS} tries): {errors[-1]}")


def evict_shards(folder: Path, keep: Path, max_bytes: int) -> None:
    """Delete the least recently used shard files of the data set cached in ``folder`` until they hold at most
    ``max_bytes`` (``keep``, the one just fetched, stays)."""
    files = sorted((p for p in (folder / "shards").glob("*.tar") if p != keep),
                   key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files) + keep.stat().st_size
    while files and total > max_bytes:
        oldest = files.pop(0)
        total -= oldest.stat().st_size
        oldest.unlink()
        logger.info("data cache over %d bytes: removed %s", max_bytes, oldest.name)
