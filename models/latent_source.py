"""A prepared text-to-image data set as a data source (``manifest:FOLDER`` or ``manifest:URL``): read by shard."""

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from omi.models.data import DataSource, DataSourceError, parse_source
from omi.models.data_cache import DATA_CACHE_BYTES, evict_shards, fetch_manifest, fetch_to_cache, url_cache_folder
from omi.protos.data_ref import DataRef
from omi.protos.dataset import DATASET_MANIFEST_NAME
from omi.protos.files import sha256_file


class LatentShardSource(DataSource):
    """A prepared text-to-image data set (``omi-data prepare``): latents and caption embeddings, read by shard.

    Opening reads only the manifest; a prepared shard is read (and its sha256 checked) the first time one of its
    samples is asked for, and at most ``cache_shards`` of them stay in memory. From a URL (``http://coordinator/runs/
    RUN/data``, as the coordinator hands a run to nodes, with ``#sha256:`` pinning the manifest) only the shards
    asked for are fetched: resumably, sha256-checked, from the coordinator or the manifest's mirrors, with retries,
    into a disk cache kept under ``max_cache_bytes`` (least recently used shards go first). ``get`` returns a
    :class:`~omi.models.flow.LatentBatch`; the run's work shards (``shard_size``) are independent of the
    prepared ones.

    :param where: the data set's folder (``manifest.json``, ``shards/``, ``null_caption.npy``) or base URL, with
        ``#sha256:HEX`` pinning its manifest; or the parsed ``manifest:`` source
    :param cache_dir: where a fetched data set is cached (default :func:`~omi.models.data_cache.data_cache_dir`)
    :param max_cache_bytes: bound of the shard files cached on disk
    """

    def __init__(self, where: str | Path | DataRef, shard_size: int, resolution: int, *, cache_shards: int = 8,
                 cache_dir: str | Path | None = None, max_cache_bytes: int = DATA_CACHE_BYTES):
        from omi.protos.dataset import ManifestError, parse_manifest

        ref = where if isinstance(where, DataRef) else parse_source(f"manifest:{where}")
        assert ref.is_manifest, f"{ref} is not a prepared data set"
        self.url = ref.url or ""
        self.max_cache_bytes = max_cache_bytes
        if self.url:  # fetched over HTTP into a cache folder of its own
            self.folder = url_cache_folder(self.url, cache_dir)
            self.folder.mkdir(parents=True, exist_ok=True)
            manifest_bytes = fetch_manifest(self.url, self.folder)
        else:
            self.folder = ref.folder
            path = self.folder / DATASET_MANIFEST_NAME
            if not path.is_file():
                raise DataSourceError(f"no dataset manifest at {path}")
            manifest_bytes = path.read_bytes()
        if ref.pinned_sha256 and hashlib.sha256(manifest_bytes).hexdigest() != ref.pinned_sha256:
            raise DataSourceError(f"{ref.where}: the manifest is not the one the run names (sha256 differs)")
        try:
            self.manifest = parse_manifest(manifest_bytes)
        except ManifestError as e:
            raise DataSourceError(f"{ref.where}: {e}") from e
        if self.url:
            (self.folder / DATASET_MANIFEST_NAME).write_bytes(manifest_bytes)
        super().__init__(str(ref), shard_size, resolution, self.manifest.channels)
        if resolution != self.manifest.resolution:
            raise DataSourceError(f"{self.folder}: prepared at {self.manifest.resolution} px, the run asks for "
                                  f"{resolution}")
        self.starts = np.cumsum([0] + [shard.samples for shard in self.manifest.shards])
        self.cache_shards = cache_shards
        self.fetched_bytes = 0  # bytes this source downloaded
        self._parts = None  # the frozen parts, once asked for
        self._shards: dict[int, list[tuple[torch.Tensor, torch.Tensor, dict]]] = {}
        self.null = torch.from_numpy(np.load(self._checked(self.manifest.null_caption)).astype(np.float32))

    def _fetch(self, ref) -> None:
        """Download one file of the data set into the cache, from the coordinator or a mirror
        (:func:`~omi.models.data_cache.fetch_to_cache`); then keep the cache under its size bound."""
        bases = [self.url, *(mirror.rstrip("/") for mirror in self.manifest.mirrors)]
        self.fetched_bytes += fetch_to_cache(ref, bases, self.folder)
        evict_shards(self.folder, keep=self.folder / ref.file, max_bytes=self.max_cache_bytes)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _checked(self, ref) -> io.BytesIO:
        path = self.folder / ref.file
        if self.url and not path.is_file():
            self._fetch(ref)
        if not path.is_file():
            raise DataSourceError(f"{path} is missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            if not self.url:
                raise DataSourceError(f"{path} does not match the manifest's sha256: corrupt or changed")
            path.unlink()  # a cached copy that changed on disk: fetch it again
            self._fetch(ref)
            data = path.read_bytes()
        os.utime(path)  # recently used: the cache keeps it longest
        return io.BytesIO(data)

    def _shard(self, shard_id: int) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
        if shard_id not in self._shards:
            ref = self.manifest.shards[shard_id]
            samples: dict[str, dict] = {}
            with tarfile.open(fileobj=self._checked(ref)) as tar:
                for member in tar.getmembers():
                    key, _, kind = member.name.partition(".")
                    samples.setdefault(key, {})[kind] = tar.extractfile(member).read()
            rows = [(torch.from_numpy(np.load(io.BytesIO(s["latent.npy"])).astype(np.float32)),
                     torch.from_numpy(np.load(io.BytesIO(s["caption.npy"])).astype(np.float32)),
                     json.loads(s["json"])) for _, s in sorted(samples.items())]
            if len(rows) != ref.samples:
                raise DataSourceError(f"{self.folder / ref.file}: {len(rows)} samples, the manifest says {ref.samples}")
            while len(self._shards) >= self.cache_shards:
                self._shards.pop(next(iter(self._shards)))
            self._shards[shard_id] = rows
        return self._shards[shard_id]

    def _row(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        shard_id = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self._shard(shard_id)[index - int(self.starts[shard_id])]

    def get(self, indices):
        """The samples at ``indices`` as one :class:`~omi.models.flow.LatentBatch`."""
        from omi.models.flow import LatentBatch

        rows = [self._row(i) for i in self._indices(indices)]
        return LatentBatch.collate(torch.stack([r[0] for r in rows]), [r[1] for r in rows], self.null)

    def frozen_parts(self):
        """The autoencoder, text encoder and tokenizer the data was prepared with (for sampling and checkpoints),
        refused unless their files hash to the manifest's ``parts.sha256``; checked and loaded once per source."""
        if self._parts is None:
            self._parts = self._load_frozen_parts()
        return self._parts

    def _load_frozen_parts(self):
        from omi.models.text_to_image import PartsNotFoundError, load_frozen_parts, parts_hash, resolve_parts

        source = self.manifest.parts.source
        beside = Path(source).expanduser()
        if not beside.is_absolute():
            beside = self.folder / beside
        try:
            # a relative folder beside the data set first; otherwise the source as it was given to preparation (a
            # folder, or a hub id pinned to a commit); the hash below decides whether what was found is theirs
            where, _ = resolve_parts(beside if beside.exists() else source)
        except PartsNotFoundError as e:
            raise DataSourceError(f"the frozen parts of {self.folder}: {e}") from e
        if parts_hash(where) != self.manifest.parts.sha256:
            raise DataSourceError(f"the frozen parts at {where} are not the ones {self.folder} was prepared with "
                                  "(sha256 differs)")
        return load_frozen_parts(where)

    def provenance(self, work_shards: list[list[int]]) -> dict:
        """What a checkpoint trained on, for its signed manifest: the data set (its manifest's sha256), the prepared
        shards holding the samples of the run's work shards (``[first, last]`` runs of ids, as the ledger gives
        them) with their sha256, and the licence tally of those prepared shards (exact when the run's shard size is
        the data set's, a superset of the samples trained otherwise)."""
        touched: set[int] = set()
        for first, last in work_shards:
            for work_shard in range(first, last + 1):
                if work_shard < self.num_shards:
                    start, end = self.shard_range(work_shard)
                    lo = int(np.searchsorted(self.starts, start, side="right")) - 1
                    hi = int(np.searchsorted(self.starts, end - 1, side="right")) - 1
                    touched.update(range(lo, hi + 1))
        shards = [self.manifest.shards[i] for i in sorted(touched)]
        licenses: dict[str, int] = {}
        for shard in shards:
            for name, count in shard.licenses.items():
                licenses[name] = licenses.get(name, 0) + count
        return dict(dataset=self.manifest.name, manifest_sha256=sha256_file(self.folder / DATASET_MANIFEST_NAME),
                    shards=[dict(id=s.id, file=s.file, sha256=s.sha256, samples=s.samples) for s in shards],
                    licenses=licenses)

    def caption(self, index: int) -> str:
        """The caption of a sample, as it was written."""
        return self._row(index)[2]["caption"]
