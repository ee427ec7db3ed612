"""Shard sets: build them from raw datasets, adopt existing WebDataset shards, verify them.

    python -m gala_scale.shards build synthetic --out shards/synthetic
    python -m gala_scale.shards build cifar --root cifar-10-batches-py --imbalance-factor 100 \\
        --out shards/cifar10_lt_if100
    python -m gala_scale.shards build list --root places365 --list train=Places_LT_train.txt \\
        --list val=Places_LT_val.txt --list test=Places_LT_test.txt --out shards/places_lt
    python -m gala_scale.shards build inat --root inat2018 --annotations train=train2018.json \\
        --annotations val=val2018.json --max-side 400 --out shards/inat2018
    python -m gala_scale.shards index DIR      # write DALI indexes + manifest for your own shards
    python -m gala_scale.shards verify DIR     # checksums, counts, labels, every image decodes
    python -m gala_scale.shards synth --like inat2018 --scale 0.01 --root DIR   # raw, real format
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gala_scale.shards import like, sources
from gala_scale.shards.build import BuildError, build
from gala_scale.shards.check import adopt, verify
from gala_scale.shards.manifest import ManifestError

NOT_RECORDED = ("command", "kind", "out", "workers", "force")


def _split_path(text: str) -> tuple[str, Path]:
    split, sep, path = text.partition("=")
    if not sep or not split or not path:
        raise argparse.ArgumentTypeError(f"expected SPLIT=FILE, got {text!r}")
    return split, Path(path).resolve()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. shards/<name>")
    p.add_argument("--dataset", help="dataset name recorded in the manifest")
    p.add_argument("--seed", type=int, default=0, help="seeds subsampling and shard shuffling")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all)")
    p.add_argument("--max-side", type=int, help="shrink images whose longer side exceeds this")
    p.add_argument("--force", action="store_true", help="replace a set built differently")


def _add_long_tail(
    p: argparse.ArgumentParser, val_default: int | None, val_from_default: str
) -> None:
    p.add_argument("--root", type=Path, required=True, help="the raw dataset folder")
    p.add_argument(
        "--imbalance-factor", type=float, help="keep n_max * (1/IF)^(i/(C-1)) of class i"
    )
    p.add_argument(
        "--val-per-class",
        type=int,
        default=val_default,
        help="images a class in a balanced val drawn from the training images",
    )
    p.add_argument(
        "--val-from",
        choices=sources.VAL_FROM,
        default=val_from_default,
        help="reserved: val set aside before long-tailed subsampling, so every class is in it "
        "(the head trains on n_max - v images); leftover: val from the images the subset leaves "
        f"out, the literature's counts, none of the head (default: {val_from_default})",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gala_scale.shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    kinds = commands.add_parser("build", help="build a shard set").add_subparsers(
        dest="kind", required=True
    )
    cifar = kinds.add_parser("cifar", help="CIFAR-10/100: python pickles or train/ + test/ folders")
    _add_long_tail(cifar, None, "reserved")
    folder = kinds.add_parser("imagefolder", help="root/<class>/<image> (or root/<split>/...)")
    _add_long_tail(folder, 0, "leftover")
    folder.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="val: this fraction of each class (instead of --val-per-class)",
    )
    listed = kinds.add_parser("list", help="'<path> <label>' list files plus an image root")
    listed.add_argument("--root", type=Path, required=True)
    listed.add_argument(
        "--list", type=_split_path, action="append", required=True, metavar="SPLIT=FILE"
    )
    listed.add_argument("--num-classes", type=int)
    listed.add_argument("--class-names", type=Path, help="one class name a line")
    inat = kinds.add_parser("inat", help="iNaturalist 2018 annotation JSON plus an image root")
    inat.add_argument("--root", type=Path, required=True)
    inat.add_argument(
        "--annotations", type=_split_path, action="append", required=True, metavar="SPLIT=FILE"
    )
    for p in (listed, inat):
        p.add_argument("--skip-missing", action="store_true", help="build without missing files")
    synth = kinds.add_parser("synthetic", help="procedurally generated long-tailed images")
    synth.add_argument("--num-classes", type=int, default=10)
    synth.add_argument("--imbalance-factor", type=float, default=100.0)
    synth.add_argument("--max-per-class", type=int, default=500)
    synth.add_argument("--val-per-class", type=int, default=20)
    synth.add_argument("--test-per-class", type=int, default=100)
    synth.add_argument("--image-size", type=int, default=32)
    for p in (cifar, folder, listed, inat, synth):
        _add_common(p)
    for name, text in (
        ("index", "write DALI indexes and a manifest for existing shards"),
        ("verify", "check a shard set against its manifest"),
    ):
        p = commands.add_parser(name, help=text)
        p.add_argument("dir", type=Path)
        if name == "index":
            p.add_argument("--num-classes", type=int)
            p.add_argument("--class-names", type=Path)
            p.add_argument("--dataset")
        else:
            p.add_argument("--workers", type=int, default=os.cpu_count())
    synth_like = commands.add_parser(
        "synth", help="synthetic raw data in a real dataset's format and class profile"
    )
    synth_like.add_argument("--like", choices=sorted(like.PROFILES), required=True)
    synth_like.add_argument("--scale", type=float, default=1.0, help="x the real class counts")
    synth_like.add_argument("--root", type=Path, required=True, help="where the raw data goes")
    synth_like.add_argument("--seed", type=int, default=0)
    synth_like.add_argument(
        "--image-size", type=_size, help="WxH instead of the dataset's typical size"
    )
    synth_like.add_argument("--workers", type=int, default=os.cpu_count())
    return parser


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.partition("x")
    if not (sep and width.isdigit() and height.isdigit()) or int(width) < 8 or int(height) < 8:
        raise argparse.ArgumentTypeError(f"expected WxH of at least 8x8, got {text!r}")
    return int(width), int(height)


def _plan(args: argparse.Namespace) -> sources.Plan:
    common = {"dataset": args.dataset}
    if args.kind in ("cifar", "imagefolder"):
        plan = sources.plan_cifar if args.kind == "cifar" else sources.plan_imagefolder
        if args.kind == "imagefolder":
            common["val_fraction"] = args.val_fraction
        return plan(
            args.root.resolve(),
            args.imbalance_factor,
            args.val_per_class,
            args.seed,
            val_from=args.val_from,
            **common,
        )
    if args.kind == "list":
        return sources.plan_list(
            args.root.resolve(),
            dict(args.list),
            args.num_classes,
            args.class_names,
            args.skip_missing,
            **common,
        )
    if args.kind == "inat":
        return sources.plan_inat(
            args.root.resolve(), dict(args.annotations), args.skip_missing, **common
        )
    return sources.plan_synthetic(
        args.num_classes,
        args.imbalance_factor,
        args.max_per_class,
        args.val_per_class,
        args.test_per_class,
        args.image_size,
        args.seed,
        **common,
    )


def _record(args: argparse.Namespace) -> dict:
    """The arguments that determine the set's content, as JSON."""
    record = {"kind": args.kind}
    for key, value in sorted(vars(args).items()):
        if key in NOT_RECORDED:
            continue
        if isinstance(value, Path):
            value = str(value.resolve())
        elif isinstance(value, list):
            value = {split: str(path) for split, path in value}
        record[key] = value
    return record


def _summary(manifest: dict, out: Path) -> str:
    lines = [f"{out}: {manifest['dataset']}, {manifest['num_classes']} classes"]
    for split, info in manifest["splits"].items():
        counts = info["class_counts"]
        lines.append(
            f"  {split}: {info['num_samples']} images in {len(info['shards'])} shards, "
            f"{max(counts)} down to {min(counts)} a class"
        )
    if manifest["excluded"]:
        lines.append(f"  excluded: {len(manifest['excluded'])} (listed in manifest.json)")
    lines += [f"  warning: {w}" for w in manifest.get("warnings", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "verify":
            problems = verify(args.dir, args.workers)
            for problem in problems:
                print(problem, file=sys.stderr)
            print(f"{args.dir}: {'OK' if not problems else f'{len(problems)} problems'}")
            return 1 if problems else 0
        if args.command == "synth":
            root = args.root.resolve()
            written = like.synthesize(
                args.like, args.scale, root, args.seed, args.image_size, args.workers
            )
            for split, counts in written.items():
                print(f"{split}: {sum(counts)} images, {max(counts)} down to {min(counts)} a class")
            out = Path("shards") / f"{args.like}_x{args.scale:g}"
            print(
                "next: python -m gala_scale.shards "
                + " ".join(like.build_command(args.like, root, out))
            )
            return 0
        if args.command == "index":
            names = None
            if args.class_names:
                names = [n.strip() for n in args.class_names.read_text().splitlines() if n.strip()]
            manifest = adopt(args.dir, args.num_classes, names, args.dataset)
            print(_summary(manifest, args.dir))
            return 0
        plan = _plan(args)
        manifest = build(
            plan,
            args.out,
            _record(args),
            seed=args.seed,
            shard_size=args.shard_size,
            workers=args.workers,
            max_side=args.max_side,
            force=args.force,
        )
        print(_summary(manifest, args.out))
        return 0
    except (sources.SourceError, BuildError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
