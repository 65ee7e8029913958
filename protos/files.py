"""Files as a manifest (a checkpoint's, a data set's) lists them: a path inside the manifest's folder, and a sha256.

Everyone who hashes a file calls :func:`sha256_file`: the checkpointer and ``omi-data prepare`` writing a manifest,
``omi-node download`` and the coordinator checking one, a data set's provenance naming its manifest. Every path a
manifest lists is a :data:`RelativePath`, so no reader of a manifest reaches outside its folder.

>>> import tempfile
>>> with tempfile.NamedTemporaryFile() as f:
...     _ = f.write(b"abc"), f.flush()
...     sha256_file(f.name)
'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'
>>> inside_folder("unet/config.json")
'unet/config.json'
>>> inside_folder("../coordinator_key.pem")
Traceback (most recent call last):
...
ValueError: must be a relative path inside the manifest's folder, not '../coordinator_key.pem'
"""

import hashlib
from pathlib import Path, PurePosixPath
from typing import Annotated

from pydantic import AfterValidator, Field


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file at ``path``, read in chunks (a checkpoint's weights can be larger than memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def inside_folder(value: str) -> str:
    """``value`` if it is a relative POSIX path that stays inside its folder, else ``ValueError``."""
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
        raise ValueError(f"must be a relative path inside the manifest's folder, not {value!r}")
    return value


RelativePath = Annotated[str, AfterValidator(inside_folder)]  # a path a manifest lists
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # a sha256 as a manifest gives it: hex, lower case
