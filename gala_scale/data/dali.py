"""The DALI pipeline: ``fn.readers.webdataset`` over the shard set's index files.

With CUDA, images are decoded by nvJPEG (``device="mixed"``) and augmented on the GPU, and
batches arrive as CUDA tensors; without it the same operators run on the CPU
(``device_id=None``). A loader builds one pipeline a split and keeps it for the whole run: the
reader reshuffles the shard order after every epoch (the same seed on every rank, so the ranks'
shares stay disjoint) and shuffles samples through its buffer. Checkpointing is on: the state of
the reader and of every random operator after the last batch handed out can be saved, and a
pipeline built from it continues exactly there, without reading back what came before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from gala_scale.data import presets
from gala_scale.data.autoaugment import (
    RANDAUGMENT_BINS,
    RANDAUGMENT_M,
    RANDAUGMENT_N,
    randaugment_translate_pixels,
    translate_pixels,
)
from gala_scale.data.common import DataError, Shard
from gala_scale.data.presets import Augment, Preset

LABEL_DIGITS = 10  # cls holds up to this many ASCII digits
SHUFFLE_BUFFER = 1024
# GPU ("mixed") decoding: nvJPEG's buffers sized up front for the largest ImageNet image, and the
# hardware decoder's for the largest image side, so no batch triggers a reallocation (the values
# NVIDIA's ResNet-50 training example uses).
MIXED_DECODER = {
    "device_memory_padding": 211_025_920,
    "host_memory_padding": 140_544_512,
    "preallocate_width_hint": 5980,
    "preallocate_height_hint": 6430,
}


def parse_cls(cls: torch.Tensor) -> torch.Tensor:
    """(B, LABEL_DIGITS) uint8 ASCII digits padded with zeros -> (B,) int64 labels."""
    digits = cls.long() - ord("0")
    valid = (digits >= 0) & (digits <= 9)
    value = torch.zeros(cls.shape[0], dtype=torch.long, device=cls.device)
    for column in range(cls.shape[1]):
        value = torch.where(valid[:, column], value * 10 + digits[:, column], value)
    return value


def _normalise(
    images, preset: Preset, device: str, mirror=None, crop: bool = False, layout: str = "CHW"
):
    kwargs = {
        "dtype": types.FLOAT,
        "output_layout": layout,
        "mean": [m * 255 for m in preset.mean],
        "std": [s * 255 for s in preset.std],
    }
    if mirror is not None:
        kwargs["mirror"] = mirror
    if crop:
        kwargs["crop"] = (preset.crop, preset.crop)
    return fn.crop_mirror_normalize(images, device=device, **kwargs)


def _eval(images, preset: Preset, device: str, layout: str):
    if preset.eval_resize is not None:
        images = fn.resize(
            images,
            device=device,
            resize_shorter=preset.eval_resize,
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
    return _normalise(images, preset, device, crop=True, layout=layout)


def _train_crop(images, preset: Preset, device: str):
    """uint8 crop x crop: resize of the random-resized-crop window, or pad + random crop."""
    if preset.random_resized_crop:
        return fn.resize(
            images,
            device=device,
            resize_x=preset.crop,
            resize_y=preset.crop,
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
    side = preset.crop + 2 * preset.pad
    images = fn.crop(
        images, device=device, crop=(side, side), out_of_bounds_policy="pad", fill_values=0
    )
    # Integer offsets 0..2*pad, each equally likely, like the torch loader's.
    offsets = [i / (2 * preset.pad) for i in range(2 * preset.pad + 1)]
    return fn.crop(
        images,
        device=device,
        crop=(preset.crop, preset.crop),
        crop_pos_x=fn.random.uniform(values=offsets),
        crop_pos_y=fn.random.uniform(values=offsets),
    )


def _train(images, preset: Preset, options: Augment, device: str, layout: str):
    """Crop, then the optional policies (as in the torch loader, same order), flip, normalise."""
    images = _train_crop(images, preset, device)
    if options.autoaugment:
        from nvidia.dali.auto_aug import auto_augment

        images = auto_augment.auto_augment(
            images,
            policy_name="reduced_cifar10",
            max_translate_abs=translate_pixels(preset.crop),
            fill_value=128,
        )
    if options.color_jitter:
        low, high = 1 - options.color_jitter, 1 + options.color_jitter
        images = fn.color_twist(
            images,
            device=device,
            brightness=fn.random.uniform(range=(low, high)),
            contrast=fn.random.uniform(range=(low, high)),
            saturation=fn.random.uniform(range=(low, high)),
        )
    if options.randaugment:
        from nvidia.dali.auto_aug import rand_augment

        images = rand_augment.rand_augment(
            images,
            n=RANDAUGMENT_N,
            m=RANDAUGMENT_M,
            num_magnitude_bins=RANDAUGMENT_BINS,
            max_translate_abs=randaugment_translate_pixels(preset.crop),
            fill_value=128,
        )
    mirror = fn.random.coin_flip(probability=0.5)
    return _normalise(images, preset, device, mirror=mirror, layout=layout)


def build_pipeline(
    shards: list[Shard],
    image_ext: str,
    preset: Preset,
    options: Augment,
    *,
    train: bool,
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    shuffle_seed: int,
    device_id: int | None,
    num_threads: int,
    channels_last: bool = False,
    checkpoint: bytes | None = None,
):
    gpu = device_id is not None
    hints = MIXED_DECODER if gpu else {}
    conditionals = options.autoaugment or options.randaugment

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        enable_conditionals=conditionals,
        prefetch_queue_depth=2,
        enable_checkpointing=True,
    )
    def pipeline():
        encoded, cls = fn.readers.webdataset(
            paths=[str(s.tar) for s in shards],
            index_paths=[str(s.index) for s in shards],
            ext=[image_ext, "cls"],
            missing_component_behavior="error",
            random_shuffle=train,
            initial_fill=SHUFFLE_BUFFER,
            # Training: a new shard order every epoch, alike on every rank. Evaluation: each rank
            # reads the same share every time.
            stick_to_shard=not train,
            **(
                {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": shuffle_seed}
                if train
                else {}
            ),
            shard_id=rank,
            num_shards=world,
            pad_last_batch=True,
            name="reader",
        )
        device = "gpu" if gpu else "cpu"
        decoder = "mixed" if gpu else "cpu"
        if train and preset.random_resized_crop:
            images = fn.decoders.image_random_crop(
                encoded,
                device=decoder,
                output_type=types.RGB,
                random_area=list(presets.RRC_SCALE),
                random_aspect_ratio=list(presets.RRC_RATIO),
                num_attempts=10,
                **hints,
            )
        else:
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, **hints)
        labels = fn.pad(cls, axes=(0,), shape=(LABEL_DIGITS,), fill_value=0)
        # NHWC batches are channels_last NCHW tensors once permuted: no copy for the model.
        layout = "HWC" if channels_last else "CHW"
        if train:
            images = _train(images, preset, options, device, layout)
        else:
            images = _eval(images, preset, device, layout)
        return images, labels

    return pipeline(checkpoint=checkpoint)


@contextlib.contextmanager
def _named_decode_errors(where: str):
    """DALI decoder errors name neither set nor sample: name the set, and how to find the sample."""
    try:
        yield
    except RuntimeError as err:
        if "decoders.image" not in str(err):
            raise
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = [line for line in lines if "no longer valid" not in line] or lines or [""]
        raise DataError(
            f"{where}: an image does not decode (DALI: {cause[-1]}); "
            "`python -m gala_scale.shards verify` on the set names the sample"
        ) from err


class Stream:
    """A split's pipeline and iterator, read epoch after epoch for a whole run.

    ``epoch`` is the epoch being read and ``position`` how many of its batches have been handed
    out; ``checkpoint()`` is the pipeline's state at that point. ``built`` is the epoch whose
    seeds built the pipeline: a pipeline restored from a checkpoint is built alike.
    """

    def __init__(
        self,
        pipe,
        epoch: int,
        *,
        built: int,
        channels_last: bool,
        position: int = 0,
        where: str = "",
    ):
        self.built = built
        self.where = where  # named in errors: the split's shard set
        with _named_decode_errors(where):  # the iterator runs the pipeline ahead
            self.iterator = DALIGenericIterator(
                [pipe],
                ["images", "cls"],
                reader_name="reader",
                last_batch_policy=LastBatchPolicy.PARTIAL,
                auto_reset=False,
            )
        self.epoch, self.position, self.channels_last = epoch, position, channels_last

    def _next(self):
        """The next batch, or None at the epoch's end. (``iter()`` on a DALI iterator resets it.)"""
        try:
            return next(self.iterator)[0]
        except StopIteration:
            return None

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the epoch's (images, labels) batches, the last one partial."""
        with _named_decode_errors(self.where):
            while (batch := self._next()) is not None:
                self.position += 1
                images = batch["images"]
                if self.channels_last:
                    images = images.permute(0, 3, 1, 2)
                yield images, parse_cls(batch["cls"])

    def finish(self) -> None:
        """Read out the epoch's rest (a batch or two that training drops) and start the next."""
        with _named_decode_errors(self.where):
            while self._next() is not None:
                pass
            self.iterator.reset()
        self.epoch, self.position = self.epoch + 1, 0

    def checkpoint(self) -> bytes:
        return self.iterator.checkpoints()[0]
