"""Classifier heads: ``model.head: linear`` (the architecture's own) or ``cosine``.

The cosine head (the normalised classifier of LDAM's and GCL's recipes) computes
``cos(x, w_k) = <x / |x|, w_k / |w_k|>`` for every class k, with no bias. Losses that apply their
own scale to such logits (``ldam``, ``ldam_drw``, ``gcl``: cross-entropy of ``scale * (cos -
margin or cloud)``) train on the cosines themselves; every other loss trains on
``scale * cos``. Evaluation and the exported graph always return ``scale * cos``, so that the
softmax of what they return is the probability the loss trained (PN, ECE and the server read
it); ``scale`` is ``model.cosine_scale`` or, when that is 0, the loss's ``loss.scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gala_scale.models.pretrained import head_module

HEADS = ("linear", "cosine")


class CosineLinear(nn.Module):
    """Cosine logits, scaled by ``scale`` in evaluation and, unless ``loss_scales``, in training
    too (the module docstring)."""

    def __init__(
        self, in_features: int, out_features: int, scale: float, loss_scales: bool
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"model.cosine_scale: the cosine head needs a scale > 0, got {scale}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's initialisation
        self.scale, self.loss_scales = float(scale), bool(loss_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cosine = F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T
        return cosine if self.training and self.loss_scales else self.scale * cosine

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scale={self.scale}, loss_scales={self.loss_scales}"
        )


def replace_head(model: nn.Module, head: nn.Module) -> nn.Module:
    """Put ``head`` where the model's classifier (``pretrained.head_module``) is; returns it."""
    old = head_module(model)
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, head)
                return model
    raise ValueError(f"{type(model).__name__}: its classifier is not a named submodule")


def cosine_head(model: nn.Module, scale: float, loss_scales: bool) -> nn.Module:
    """The model with a :class:`CosineLinear` of the same shape in place of its linear head."""
    old = head_module(model)
    if not isinstance(old, nn.Linear):
        raise ValueError(
            f"model.head: cosine needs a linear classifier, found {type(old).__name__}"
        )
    return replace_head(model, CosineLinear(old.in_features, old.out_features, scale, loss_scales))


def load_head(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a classifier's weights into the model's head: a linear head's ``weight``/``bias``, a
    cosine head's ``weight``, or a stage-2 classifier on standardised features (``fc.*``,
    ``mean``, ``std``: gala_scale.stage2.Standardized), which a linear head takes folded (the
    same function of the raw features)."""
    if "mean" in weights:
        fc = {k.removeprefix("fc."): v for k, v in weights.items() if k.startswith("fc.")}
        if "bias" not in fc:
            raise ValueError("a standardised cosine classifier cannot be folded into one layer")
        weight = fc["weight"] / weights["std"]
        weights = {"weight": weight, "bias": fc["bias"] - weight @ weights["mean"]}
    head_module(model).load_state_dict(weights)
