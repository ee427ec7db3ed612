"""Write a plan's samples as a shard set: shuffled, in parallel, atomically.

The set is written into ``.<name>.partial-<pid>`` beside the output folder and renamed into place
only when every shard, index and the manifest are on disk, so an interrupted build never leaves a
folder that looks complete. Building again with the same arguments over a complete set is a
no-op; other arguments need ``force``.
"""

from __future__ import annotations

import datetime as _dt
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gala_scale.shards import images, tario
from gala_scale.shards.manifest import FORMAT_VERSION, MANIFEST, load_manifest, write_json_atomic
from gala_scale.shards.sources import Item, Plan

IMAGE_EXT = "jpg"
_PLAN: Plan | None = None  # the plan, inherited by forked workers


class BuildError(RuntimeError):
    pass


def _write_shard(job: tuple[Path, str, list[Item], int | None]) -> dict:
    """Load, check and encode one shard's samples; write its tar and DALI index."""
    tar_path, split, items, max_side = job
    written, counts, excluded = [], {}, []
    for item in items:
        try:
            data = images.encode(_PLAN.load(item.ref), max_side)
        except (images.BadImage, OSError) as err:
            excluded.append({"split": split, "source": str(item.ref), "reason": str(err)})
            continue
        written.append((item.key, {IMAGE_EXT: data, "cls": str(item.label).encode()}))
        counts[item.label] = counts.get(item.label, 0) + 1
    result = {"split": split, "counts": counts, "excluded": excluded, "num_samples": len(written)}
    if written:
        tario.write_tar(tar_path, written)
        tario.write_index(tar_path, tar_path.with_suffix(".idx"))
        result["sha256"] = tario.sha256(tar_path)
        result["file"] = tar_path
    return result


def _jobs(plan: Plan, tmp: Path, shard_size: int, seed: int, max_side) -> list[tuple]:
    jobs = []
    for split_no, (split, items) in enumerate(plan.splits.items()):
        (tmp / split).mkdir(parents=True)
        # Shuffle across shards here: DALI's reader only shuffles within a buffer.
        order = np.random.default_rng([seed, split_no]).permutation(len(items))
        shuffled = [items[i] for i in order]
        for number, start in enumerate(range(0, len(shuffled), shard_size)):
            path = tmp / split / f"{split}-{number:06d}.tar"
            jobs.append((path, split, shuffled[start : start + shard_size], max_side))
    return jobs


def _run_jobs(jobs: list[tuple], workers: int, total: int) -> list[dict]:
    results = []
    bar = tqdm(total=total, unit="img", desc="building shards", disable=None, file=sys.stderr)
    if workers <= 1:
        outputs = map(_write_shard, jobs)
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(workers)
        outputs = pool.imap_unordered(_write_shard, jobs)
    try:
        for result in outputs:
            results.append(result)
            bar.update(result["num_samples"] + len(result["excluded"]))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return results


def _manifest(plan: Plan, results: list[dict], tmp: Path, record: dict, seed: int) -> dict:
    num_classes = len(plan.class_names)
    splits = {}
    for split in plan.splits:
        mine = sorted(
            (r for r in results if r["split"] == split and r["num_samples"]),
            key=lambda r: r["file"],
        )
        counts = [0] * num_classes
        for r in mine:
            for label, n in r["counts"].items():
                counts[label] += n
        splits[split] = {
            "num_samples": sum(counts),
            "class_counts": counts,
            "shards": [
                {
                    "file": str(r["file"].relative_to(tmp)),
                    "index": str(r["file"].with_suffix(".idx").relative_to(tmp)),
                    "num_samples": r["num_samples"],
                    "sha256": r["sha256"],
                }
                for r in mine
            ],
        }
    excluded = plan.excluded + [e for r in results for e in r["excluded"]]
    return {
        "format_version": FORMAT_VERSION,
        "dataset": plan.dataset,
        "num_classes": num_classes,
        "class_names": plan.class_names,
        "image_ext": IMAGE_EXT,
        "image_encoding": {
            "format": "jpeg",
            "reencode_quality": images.JPEG_QUALITY,
            "kept_as_is": "JPEG sources in RGB or grayscale",
        },
        "label_encoding": "cls: the class index as ASCII decimal digits",
        "seed": seed,
        "build": record,
        "splits": splits,
        "val_from": plan.val_from or None,
        "excluded": sorted(excluded, key=lambda e: (e["split"], e["source"])),
        "warnings": plan.warnings,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_partials(out: Path) -> None:
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def existing_set_matches(out: Path, record: dict, force: bool) -> bool:
    """True when ``out`` is a complete set built with ``record``; raise if it is in the way."""
    if not out.exists():
        return False
    if (out / MANIFEST).is_file() and load_manifest(out).get("build") == record:
        return True
    if not force:
        what = (
            "a shard set built with other arguments"
            if (out / MANIFEST).is_file()
            else ("files but no manifest")
        )
        raise BuildError(f"{out} holds {what}; pass --force to replace it")
    return False


def build(
    plan: Plan,
    out: Path,
    record: dict,
    *,
    seed: int,
    shard_size: int = 1000,
    workers: int = 1,
    max_side: int | None = None,
    force: bool = False,
) -> dict:
    """Write ``plan`` as a shard set in ``out``; returns the manifest."""
    global _PLAN
    out = out.resolve()
    if existing_set_matches(out, record, force):
        print(f"{out}: up to date (same build arguments)", file=sys.stderr)
        return load_manifest(out)
    if shard_size < 1:
        raise BuildError(f"--shard-size must be >= 1, got {shard_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    _PLAN = plan
    try:
        jobs = _jobs(plan, tmp, shard_size, seed, max_side)
        results = _run_jobs(jobs, workers, sum(len(j[2]) for j in jobs))
        manifest = _manifest(plan, results, tmp, record, seed)
        write_json_atomic(tmp / MANIFEST, manifest)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        _PLAN = None
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
