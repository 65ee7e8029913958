"""The input of data preparation (``omi-data prepare``): image-caption samples with their licences, in a fixed order.

Input is one of

- ``builtin:digits``: scikit-learn's bundled digits, captioned "a handwritten digit seven" (UCI, CC BY 4.0);
- an image folder: every ``NAME.png|jpg|jpeg|webp`` with ``NAME.json`` (``caption``, ``license``, optionally
  ``source`` and ``attribution``) or ``NAME.txt`` (the caption; the licence then comes from ``--license``);
- webdataset tars (a brace pattern or a glob): ``KEY.png|jpg|webp`` with ``KEY.json`` or ``KEY.txt`` as above.
"""

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from omi.models.data import IMAGE_EXTENSIONS, digit_caption, expand_pattern, load_image


class PreparationError(ValueError):
    """Input or output that preparation cannot use; the message names it."""


@dataclass
class RawSample:
    """One input sample before encoding: a key, how to decode its image, and its metadata."""

    key: str
    image: Callable[[], torch.Tensor]  # -> uint8 (C, R, R); raises on a corrupt image
    caption: str | None
    license: str | None
    source: str = ""
    attribution: str = ""


def _sidecar(meta: dict | None, text: str | None, default_license: str | None) -> dict:
    meta = dict(meta or {})
    caption = meta.get("caption") if meta.get("caption") is not None else text
    return dict(caption=caption.strip() if isinstance(caption, str) else None,
                license=meta.get("license") or default_license, source=str(meta.get("source", "")),
                attribution=str(meta.get("attribution", "")))


def read_input(where: str, *, resolution: int, channels: int,
               default_license: str | None = None) -> Iterator[RawSample]:
    """The input samples in a fixed order (see the module docstring for the layouts)."""
    if where == "builtin:digits":
        from omi.models.data import DigitsSource

        digits = DigitsSource(shard_size=1, resolution=resolution, channels=channels)
        pixels = ((digits.images + 1) * 127.5).round().to(torch.uint8)
        for i in range(len(digits)):
            yield RawSample(key=f"digits-{i:05d}", image=lambda i=i: pixels[i], caption=digit_caption(digits.labels[i]),
                            license="CC-BY-4.0", source="https://archive.ics.uci.edu/dataset/80",
                            attribution="E. Alpaydin, C. Kaynak, UCI ML Repository")
        return
    root = Path(where).expanduser()
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise PreparationError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for file in files:
            meta_file, text_file = file.with_suffix(".json"), file.with_suffix(".txt")
            try:
                meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {"caption": None}
            text = text_file.read_text() if text_file.is_file() else None
            yield RawSample(key=file.relative_to(root).as_posix(),
                            image=lambda file=file: load_image(file, resolution, channels),
                            **_sidecar(meta if isinstance(meta, dict) else {}, text, default_license))
        return
    urls = expand_pattern(where)
    if not urls or not all(os.path.isfile(u) for u in urls):
        raise PreparationError(f"input {where!r} is not builtin:digits, an image folder, or tar files that exist")
    for url in urls:
        for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False, nodesplitter=None,
                                     workersplitter=None):
            image_key = next((k for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
            try:
                meta = json.loads(sample["json"]) if "json" in sample else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {"caption": None}
            text = sample["txt"].decode("utf-8", "replace") if "txt" in sample else None
            data = sample.get(image_key) if image_key else None

            def decode(data=data):
                if data is None:
                    raise ValueError("no image in sample")
                return load_image(data, resolution, channels)

            yield RawSample(key=f"{os.path.basename(url)}:{sample['__key__']}", image=decode,
                            **_sidecar(meta if isinstance(meta, dict) else {}, text, default_license))
