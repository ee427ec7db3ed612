"""Reading and writing WebDataset tar shards and their DALI index files.

A sample is the files of one ``__key__`` (the file name up to its first dot): here an encoded
image (``jpg``) and its label as ASCII digits (``cls``), which the ``webdataset`` library decodes
to an int and DALI's ``fn.readers.webdataset`` returns as bytes. Tars are written with fixed
metadata (mtime 0, uid 0), so the same samples give the same bytes and the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

INDEX_VERSION = "v1.2"  # DALI's index format: "v1.2 N", then "ext offset size name ..." a sample


def split_key(name: str) -> tuple[str, str]:
    """``dir/abc.seg.jpg`` -> (``dir/abc``, ``seg.jpg``): the key ends at the first dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write ``(key, {ext: bytes})`` samples to ``path``; returns how many were written."""
    count = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


def iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for each sample of a tar, in file order."""
    key, files = None, {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name_key, ext = split_key(member.name)
            if name_key != key and files:
                yield key, files
                files = {}
            key = name_key
            files[ext] = tar.extractfile(member).read()
    if files:
        yield key, files


def write_index(tar_path: Path, index_path: Path) -> int:
    """Write DALI's index for ``tar_path`` (what ``wds2idx`` writes); returns the sample count."""
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_key(member.name)
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if key != last_key:
                samples.append([entry])
                last_key = key
            else:
                samples[-1].append(entry)
    if not samples:
        raise ValueError(f"{tar_path}: no samples in the tar")
    lines = [f"{INDEX_VERSION} {len(samples)}", *(" ".join(s) for s in samples)]
    index_path.write_text("\n".join(lines) + "\n")
    return len(samples)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
