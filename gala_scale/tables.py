"""The tables of ``python -m gala_scale.reproduce``: each run's test figures by post-hoc variant,
and the markdown section of a raw results file (mean +- sample std over its seeds)."""

from __future__ import annotations

import statistics

# The table's name of each post-hoc variant, by the start of its key in results.json.
PN_NAMES = {
    "plain": "plain",
    "PN, val scales": "PN (val scales)",
    "PN, transductive": "PN (transductive, paper's protocol)",
    "post-hoc LA": "post-hoc LA (val tau)",
    "tau-norm": "tau-norm (val tau)",
}


def variant_results(res: dict, per_class: bool) -> dict:
    """A run's test figures under :data:`PN_NAMES`, optionally with the per-class accuracies."""
    keys = ("top1", "many", "medium", "few", "ece") + (("per_class",) if per_class else ())
    out = {}
    for key, figures in res["test"].items():
        (name,) = [n for start, n in PN_NAMES.items() if key.startswith(start)]
        out[name] = {k: figures[k] for k in keys if k in figures}
    return out


def cell(values: list) -> str:
    """Percent, mean +- sample std over seeds when there are several; '-' for an empty group."""
    if any(v is None for v in values):
        return "-"
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.1f}"
    return f"{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f}"


def tables(raw: dict, file: str = "") -> list[str]:
    """The markdown section for one raw results file (what ``--tables`` prints); ``file`` is
    its name where it was renamed from the ``<name>_<epochs>ep.json`` that reproduce writes."""
    seeds = raw["seeds"]
    file = file or f"{raw['name']}_{raw['epochs']}ep.json"
    rows = [
        "| loss | seeds | post-hoc | overall | many | medium | few | ECE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, by_seed in raw["runs"].items():
        mine = sorted(by_seed, key=int)
        for pn in PN_NAMES.values():
            if not all(pn in by_seed[seed]["test"] for seed in mine):
                continue  # a variant that runs of an earlier version did not score
            cells = [
                cell([by_seed[seed]["test"][pn].get(k) for seed in mine])
                for k in ("top1", "many", "medium", "few", "ece")
            ]
            rows.append(f"| {name} | {', '.join(mine)} | {pn} | " + " | ".join(cells) + " |")
    spread = "a cell over several seeds is their mean ± sample std" if len(seeds) > 1 else ""
    return [
        f"## {raw['name']}, {raw['epochs']} epochs ({raw['model']}, "
        + (f"seeds {', '.join(map(str, seeds))})" if len(seeds) > 1 else f"seed {seeds[0]})"),
        "",
        f"Command: `{raw['command']}`",
        "",
        f"Date: {raw['date']}. Machine: {raw['machine']}. Val: {raw['val_from']}. "
        f"Raw figures: `results/{file}`" + (f"; {spread}" if spread else "") + ".",
        "",
        *rows,
        "",
    ]
