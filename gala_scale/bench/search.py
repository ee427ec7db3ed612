"""Benchmark: the post-hoc tau searches of a run's report, by the table and by definition.

    python -m gala_scale.bench search [--classes 8142] [--samples 8142] [--dim 512] [--repeats 3]

Side by side in one run, interleaved rounds, medians, on random probabilities and features of
``--samples`` rows and ``--classes`` classes: each search over ``rebalance.TAUS`` (21 taus) as
the report runs it (:func:`rebalance.adjusted_argmax`, :func:`rebalance.normalised_argmax`: one
pass over blocks of rows for every tau) and as its definition reads, a tau at a time
(``apply(...).argmax`` and ``tau_normalised(...).argmax``). Both give the same argmaxes.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from gala_scale import rebalance
from gala_scale.bench.common import interleaved_medians, machine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=int, default=8142)
    parser.add_argument("--samples", type=int, default=8142)
    parser.add_argument("--dim", type=int, default=512, help="feature size of the tau-norm head")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per candidate")


def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((args.samples, args.classes), dtype=np.float32) * 3
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    scales = rebalance.fit(probs)
    features = rng.standard_normal((args.samples, args.dim), dtype=np.float32)
    weight = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    weight *= rng.uniform(0.2, 5.0, (args.classes, 1)).astype(np.float32)
    taus = rebalance.TAUS

    def table_pn():
        predict = rebalance.adjusted_argmax(probs, scales)
        return [predict(t) for t in taus]

    def definition_pn():
        return [rebalance.apply(probs, scales, t).argmax(1) for t in taus]

    def table_norm():
        predict = rebalance.normalised_argmax(features, weight)
        return [predict(t) for t in taus]

    def definition_norm():
        return [rebalance.tau_normalised(features, weight, t).argmax(1) for t in taus]

    agree = {
        "pn": all((a == b).all() for a, b in zip(table_pn(), definition_pn(), strict=True)),
        "tau_norm": all(
            (a == b).mean() > 0.999 for a, b in zip(table_norm(), definition_norm(), strict=True)
        ),  # the product in another order: a near tie may round the other way
    }
    fns = {
        "pn_table": table_pn,
        "pn_definition": definition_pn,
        "tau_norm_table": table_norm,
        "tau_norm_definition": definition_norm,
    }
    medians = interleaved_medians(fns, args.repeats, warmup=1)
    for name, seconds in medians.items():
        print(f"{name}: {seconds:.3f} s for {len(taus)} taus", flush=True)
    return {
        "benchmark": "search",
        "classes": args.classes,
        "samples": args.samples,
        "dim": args.dim,
        "taus": len(taus),
        "seconds": {k: float(f"{v:.4g}") for k, v in medians.items()},
        "pn_speedup": round(medians["pn_definition"] / medians["pn_table"], 2),
        "tau_norm_speedup": round(medians["tau_norm_definition"] / medians["tau_norm_table"], 2),
        "same_argmax": agree,
        "machine": machine(),
    }
