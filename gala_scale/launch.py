"""The command that starts the trainer with N processes on this machine (for scripts and tools).

One process is plain ``python -m gala_scale.train``. More go through ``accelerate launch
--multi_gpu`` (which on a machine without CUDA becomes gloo, because the trainer asks Accelerate
for the CPU), never ``--cpu``, which starts a single process whatever the count.
"""

from __future__ import annotations

import sys
from pathlib import Path


def train_command(processes: int = 1, port: int = 29500) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "gala_scale.train"]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        "gala_scale.train",
    ]
