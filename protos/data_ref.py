"""Where a run's samples come from: the RunSpec's ``[data] source`` text, parsed in one place.

A source is ``KIND:WHERE``: ``builtin:NAME`` (a data set bundled with omi), ``imagefolder:PATH`` (a folder of
images), ``webdataset:PATTERN`` (tar shards) or ``manifest:FOLDER`` (a prepared text-to-image data set, ``omi-data
prepare``). A prepared data set may also live at a URL and be pinned by the sha256 of its ``manifest.json``: the
coordinator hands nodes ``manifest:URL#sha256:HEX``, so they accept only the data set the run names.

>>> ref = DataRef.parse("manifest:http://coord.example.org:8080/runs/demo/data#sha256:" + "ab" * 32)
>>> ref.kind, ref.is_manifest, ref.is_url, ref.url, ref.folder, ref.pinned_sha256 == "ab" * 32
('manifest', True, True, 'http://coord.example.org:8080/runs/demo/data', None, True)
>>> str(ref) == "manifest:http://coord.example.org:8080/runs/demo/data#sha256:" + "ab" * 32
True
>>> DataRef.parse("manifest:/srv/digits-captioned").folder
PosixPath('/srv/digits-captioned')
>>> DataRef.parse("hdf5:/data")
Traceback (most recent call last):
...
omi.protos.data_ref.DataRefError: unknown data source kind 'hdf5' in 'hdf5:/data' (known: builtin, ...)
"""

import re
from dataclasses import dataclass
from pathlib import Path

KINDS = ("builtin", "imagefolder", "webdataset", "manifest")
FORMS = "builtin:NAME, imagefolder:PATH, webdataset:PATTERN or manifest:FOLDER"  # what a source may be, for errors
PIN_SEPARATOR = "#sha256:"  # between a manifest's location and the sha256 of its manifest.json


class DataRefError(ValueError):
    """A data source text that is not ``KIND:WHERE`` of a known kind, or whose pin is not a sha256."""


@dataclass(frozen=True)
class DataRef:
    """A parsed data source; ``str()`` gives back its canonical text.

    :param kind: one of :data:`KINDS`
    :param where: the NAME, PATH, PATTERN, FOLDER or URL after the kind, without the pin
    :param pinned_sha256: a manifest only: the hex sha256 its ``manifest.json`` must have, or None
    """

    kind: str
    where: str
    pinned_sha256: str | None = None

    def __post_init__(self):
        if not self.where:
            raise DataRefError(f"data source '{self}' must be {FORMS}")
        if self.kind not in KINDS:
            raise DataRefError(f"unknown data source kind '{self.kind}' in '{self}' (known: {', '.join(KINDS)})")
        if self.pinned_sha256 is not None:
            if not self.is_manifest:
                raise DataRefError(f"only a manifest data source is pinned ({PIN_SEPARATOR}HEX), not '{self}'")
            if re.fullmatch(r"[0-9a-f]{64}", self.pinned_sha256) is None:
                raise DataRefError(f"the pin of data source '{self}' must be 64 lowercase hex characters "
                                   "(the sha256 of its manifest.json)")

    @classmethod
    def parse(cls, text: str) -> "DataRef":
        """``KIND:WHERE[#sha256:HEX]`` -> DataRef; :class:`DataRefError` naming what is wrong otherwise."""
        kind, _, where = text.partition(":")
        if not where:  # the kind alone, or no kind at all: name the text as it was written
            raise DataRefError(f"data source '{text}' must be {FORMS}")
        where, separator, pin = where.partition(PIN_SEPARATOR)
        return cls(kind, where, pin if separator else None)

    def __str__(self) -> str:
        """The canonical ``KIND:WHERE[#sha256:HEX]``, as the RunSpec holds it."""
        pin = "" if self.pinned_sha256 is None else f"{PIN_SEPARATOR}{self.pinned_sha256}"
        return f"{self.kind}:{self.where}{pin}"

    @property
    def is_manifest(self) -> bool:
        """A prepared text-to-image data set (``manifest:FOLDER`` or ``manifest:URL``)."""
        return self.kind == "manifest"

    @property
    def is_url(self) -> bool:
        """WHERE is a URL (``scheme://…``): the data is served over the network, not on this machine."""
        return "://" in self.where

    @property
    def url(self) -> str | None:
        """The base URL, without a trailing slash; None for a source on this machine."""
        return self.where.rstrip("/") if self.is_url else None

    @property
    def folder(self) -> Path | None:
        """The prepared data set's folder on this machine (``manifest:FOLDER``, ``~`` expanded); None for any other
        source, a ``manifest:URL`` included."""
        return Path(self.where).expanduser() if self.is_manifest and not self.is_url else None
