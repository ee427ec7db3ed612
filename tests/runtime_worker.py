"""One rank of the agreement tests in test_runtime.py, started as a real gloo process.

Usage: python runtime_worker.py CASE DIR OUT_JSON (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in
the env). Each case writes what this rank saw to OUT_JSON.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist

from gala_scale import dist, runtime
from gala_scale.config import ConfigError


def nonfinite(rank: int, base: Path) -> dict:
    """Only rank 1 sees a NaN loss; both must stop at the next check."""
    guard = runtime.Guard()
    guard.watch(torch.tensor(1.5))
    first = guard.check(torch.tensor(1.0))
    guard.watch(torch.tensor(float("nan")) if rank == 1 else torch.tensor(2.0))
    try:
        guard.check(torch.tensor(1.0))
    except runtime.NonFiniteLoss as err:
        return {"first": list(first), "raised": str(err)}
    return {"first": list(first), "raised": None}


def stop(rank: int, base: Path) -> dict:
    """Only rank 0 got the signal; both learn it."""
    guard = runtime.Guard()
    if rank == 0:
        guard.signal = 15
    return {"stop": guard.stop_requested()}


def shared(rank: int, base: Path) -> dict:
    """Rank 1 looks at another folder, as a node-local path on another node would."""
    try:
        runtime.check_shared_run_dir(base / f"node{rank}", torch.device("cpu"))
    except ConfigError as err:
        return {"error": str(err)}
    return {"error": None}


def resume(rank: int, base: Path) -> dict:
    """Rank 1 lists an older view of the run directory: rank 0's choice wins."""
    run_dir = base / ("run" if rank == 0 else "stale")
    return {"resume": str(runtime.agreed_resume_point(run_dir, "auto"))}


CASES = {"nonfinite": nonfinite, "stop": stop, "shared": shared, "resume": resume}


def main() -> None:
    case, base, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch_dist.init_process_group("gloo")
    Path(out).write_text(json.dumps(CASES[case](dist.rank(), base)))
    torch_dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
