"""With this folder on PYTHONPATH, a training process (one that ``RANK`` marks) raises at its
first SGD step: a crash the trainer has no exit code for, as a library's bug or a bad node gives.
The launcher and the job script's own Python calls are left alone."""

import os

if "RANK" in os.environ:
    import torch

    def _crash(self, *args, **kwargs):
        raise RuntimeError("crash injected by tests/crash_site at the first SGD step")

    torch.optim.SGD.step = _crash
