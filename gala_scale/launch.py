"""The command that starts the trainer with N processes (for scripts, tools and tests), on this
machine or as one node of several.

One process is plain ``python -m gala_scale.train``. More go through ``accelerate launch
--multi_gpu`` (which on a machine without CUDA becomes gloo, because the trainer asks Accelerate
for the CPU), never ``--cpu``, which starts a single process whatever the count.
"""

from __future__ import annotations

import sys

# Accelerate's launcher without its CLI: ``accelerate launch`` first imports every subcommand,
# and the memory estimator among them imports timm and torchvision (2-3 s a launch on a CPU
# machine, before any process starts). The launcher itself, its arguments and behaviour, are
# the same.
ACCELERATE_LAUNCH = (sys.executable, "-m", "accelerate.commands.launch")


def train_command(
    processes: int = 1,
    port: int = 29500,
    deepspeed: str | None = None,
    precision: str = "no",
    module: str = "gala_scale.train",
    *,
    machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: str = "127.0.0.1",
    script: str | None = None,
) -> list[str]:
    """The launch command; ``deepspeed`` names a DeepSpeed JSON (e.g. configs/deepspeed/zero2.json)
    and ``precision`` is Accelerate's ``--mixed_precision`` (the trainer's config decides).
    ``module`` is what runs in each process (the trainer, or a benchmark's worker), or ``script``,
    a file that runs it, in its place. ``processes`` is the total over all machines, as
    Accelerate counts it; with ``machines`` > 1 this is the command of node ``machine_rank``,
    whose rendezvous is ``main_process_ip:port``."""
    if processes % machines:
        raise ValueError(f"{processes} processes do not divide over {machines} machines")
    target = [script] if script else ["-m", module]
    if processes == 1 and deepspeed is None:
        return [sys.executable, *target]
    if deepspeed is None:
        mode = ["--multi_gpu", "--mixed_precision", precision]
    else:
        mode = ["--use_deepspeed", "--deepspeed_config_file", deepspeed]
        mode += ["--deepspeed_multinode_launcher", "standard"]
    if machines > 1:
        mode += ["--machine_rank", str(machine_rank), "--main_process_ip", main_process_ip]
    return [
        *ACCELERATE_LAUNCH,
        *mode,
        "--num_processes",
        str(processes),
        "--num_machines",
        str(machines),
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        *target,
    ]
