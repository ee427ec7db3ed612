"""The shard files a run reads, checked against the manifest's sha256 before it trains.

A sample that changed after the set was built (the builder leaves out every image that does not
decode) can crash DALI's native decoder outright, a crash that a requeued job meets again at the
same place. So before training, each process hashes its share of the shards it will read (a
sha256 pass over the data, once per run: the stats of the files it found whole are remembered in
the run directory, and a requeued job checks only what changed since). A shard whose hash
differs is then read sample by sample, and the error names the sample at fault.
"""

from __future__ import annotations

import json
from pathlib import Path

from gala_scale import publish
from gala_scale.shards import tario
from gala_scale.shards.check import check_shard
from gala_scale.shards.manifest import ManifestError, load_manifest

MARKER = "shards_verified.json"


def _stat(path: Path) -> list[int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ManifestError(f"{path}: listed in its set's manifest.json but missing") from None
    return [st.st_size, st.st_mtime_ns]


def shards_to_check(root: Path, splits: list[str], run_dir: Path) -> list[dict]:
    """The manifest entries of ``splits`` whose files changed since the run last found them
    whole (all of them the first time)."""
    manifest = load_manifest(root)
    marker = run_dir / MARKER
    seen = json.loads(marker.read_text()) if marker.is_file() else {}
    todo = []
    for split in dict.fromkeys(s for s in splits if s):
        if split not in manifest["splits"]:
            raise ManifestError(f"{root}: no split {split!r}; it has {sorted(manifest['splits'])}")
        for entry in manifest["splits"][split]["shards"]:
            path = root / entry["file"]
            if seen.get(str(path)) != _stat(path):
                todo.append(entry)
    return todo


def problems_of(root: Path, entries: list[dict]) -> list[str]:
    """What is wrong with the shards ``entries`` (sha256 first; a sample-by-sample read of a
    shard whose hash differs names what changed)."""
    manifest = load_manifest(root)
    found = []
    for entry in entries:
        try:  # every rank must reach the gather after this, whatever it meets here
            if tario.sha256(root / entry["file"]) != entry["sha256"]:
                deep = check_shard(root, entry, manifest["num_classes"], manifest["image_ext"])
                found += deep or [f"{entry['file']}: sha256 differs from the manifest"]
        except OSError as err:
            found.append(f"{entry['file']}: unreadable here ({err})")
    return found


def remember(root: Path, entries: list[dict], run_dir: Path) -> None:
    """Record ``entries`` as found whole (written whole: temporary file, then rename)."""
    marker = run_dir / MARKER
    seen = json.loads(marker.read_text()) if marker.is_file() else {}
    seen |= {str(root / e["file"]): _stat(root / e["file"]) for e in entries}
    publish.write_text(marker, json.dumps(seen, indent=1))


def raise_if_any(problems: list[str], root: Path) -> None:
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ManifestError(
            f"{root}: {'; '.join(problems[:3])}{more}; the set changed after it was built "
            "(rebuild it, or restore the files)"
        )


__all__ = ["MARKER", "problems_of", "raise_if_any", "remember", "shards_to_check"]
