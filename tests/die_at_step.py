"""The trainer, except that rank ``DIE_RANK`` SIGKILLs itself at its ``DIE_AT_STEP``-th SGD step.

A rank that dies without a word (the OOM killer, a lost node) at a known step, with no timing to
win: ``accelerate launch tests/die_at_step.py <trainer args>``. With ``DIE_SIGNAL=SIGUSR1`` it is
asked to stop there instead, as Slurm asks before a preemption (``RANK`` unset counts as 0).
"""

import os
import signal
import sys

import torch

from gala_scale.train import main

_step = torch.optim.SGD.step
_calls = 0


def _step_then_maybe_die(self, *args, **kwargs):
    global _calls
    _calls += 1
    if os.environ.get("RANK", "0") == os.environ["DIE_RANK"] and _calls == int(
        os.environ["DIE_AT_STEP"]
    ):
        os.kill(os.getpid(), getattr(signal, os.environ.get("DIE_SIGNAL", "SIGKILL")))
    return _step(self, *args, **kwargs)


torch.optim.SGD.step = _step_then_maybe_die
sys.exit(main(sys.argv[1:]))
