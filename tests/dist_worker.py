"""One rank of the GALA ledger sync test, started by test_gala_loss.py as a real process.

Usage: python dist_worker.py OUT_FILE [LEDGER SYNC_EVERY LAMBDA] (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the env). The ledger syncs every SYNC_EVERY steps and after the last;
LAMBDA is both lambdas (0 makes the increments independent of the ledger).
"""

import os
import sys

import torch
import torch.distributed as torch_dist

from gala_scale.losses import GALALoss

NUM_CLASSES, BATCH, STEPS = 6, 8, 5


def rank_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0 sees classes 0-2, rank 1 classes 3-5: different labels on each rank."""
    gen = torch.Generator().manual_seed(1000 * rank + step)
    logits = torch.randn(BATCH, NUM_CLASSES, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (BATCH,), generator=gen) + 3 * rank
    return logits, labels


def main() -> None:
    torch_dist.init_process_group("gloo")
    rank = torch_dist.get_rank()
    ledger, sync_every, lambdas = (sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    loss = GALALoss(NUM_CLASSES, lambdas, lambdas, ledger=ledger).train()
    for step in range(STEPS):
        loss(*rank_batch(rank, step))
        if (step + 1) % sync_every == 0 or step + 1 == STEPS:
            loss.ledger.sync()
    used = {"logit_theta": loss.ledger.logit_theta, "logit_phi": loss.ledger.logit_phi}
    torch.save({"theta": loss.theta, "phi": loss.phi, **used}, sys.argv[1])
    torch_dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
