"""The run's machinery: the accelerator, its precision and launcher, and the decisions every rank
must agree on (where to resume, whether to stop, whether the run directory is shared).

Precision x launcher, all four tested on CPU (``tests/test_train.py``):

* DDP, ``no``: fp32.
* DDP, ``bf16``: Accelerate's torch autocast; parameters, gradients and optimizer state in fp32.
* DeepSpeed, ``no``: fp32, ZeRO-partitioned optimizer state (and gradients with ZeRO-2).
* DeepSpeed, ``bf16``: DeepSpeed's ``torch_autocast`` mode, never its ``bf16`` mode. The latter
  casts the parameters to bf16 but leaves buffers in fp32, so BatchNorm's bf16 weight meets its
  fp32 running statistics and the first forward fails ("expected scalar type BFloat16 but found
  Float"); it would also keep bf16 weights. Autocast gives the same numerics as DDP's bf16: fp32
  master weights, bf16 matmuls and convolutions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import sys
import threading
import uuid
from pathlib import Path

import torch

from gala_scale import dist
from gala_scale.checkpoint import resume_point
from gala_scale.config import ConfigError, RunConfig


class NonFiniteLoss(FloatingPointError):
    """Some rank's training loss became NaN or infinite."""


def use_cuda(cfg: RunConfig) -> bool:
    """``train.device``: auto (CUDA when present), cpu, or cuda (an error without it)."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for, but torch sees no CUDA device")
    return cfg.train.device != "cpu" and torch.cuda.is_available()


def precision(cfg: RunConfig) -> str:
    """``train.precision`` resolved: bf16 (autocast, fp32 weights) or no (fp32)."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if use_cuda(cfg) else "no"


# How long a JIT build of a torch extension (DeepSpeed's ops) may wait on another build's lock.
EXTENSION_WAIT_S = float(os.environ.get("GALA_EXTENSION_WAIT_S", "900"))


class ExtensionLockTimeout(RuntimeError):
    """A torch extension build waited past its limit on a lock (most likely left by a build
    that was killed). Under Slurm a restart builds in a fresh folder, so it is requeued."""


def private_extension_dir() -> Path:
    """Where torch builds extensions (DeepSpeed's JIT ops) for this process.

    ``TORCH_EXTENSIONS_DIR`` when set (the sbatch script gives each job a node-local one);
    otherwise a folder of this environment and torch version alone, so that no other venv or
    torch (whose lock rules differ: torch 2.13 waits for the ``lock`` file to go, 2.14 leaves it
    by design) shares its locks.

    The environment's own tools come first on the ``PATH`` of this process, as in an activated
    venv (the sbatch script activates it): torch builds with the first ``ninja`` it finds, and
    ninjas of two versions (the system's, the venv's) rebuild each other's build of the same
    folder, their build logs being of different versions.
    """
    tools = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", os.defpath)
    if path.split(os.pathsep)[0] != tools:
        os.environ["PATH"] = os.pathsep.join([tools, path])
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        venv = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
        folder = Path.home() / ".cache" / "gala_scale" / "torch_extensions"
        os.environ["TORCH_EXTENSIONS_DIR"] = str(folder / f"torch{torch.__version__}-{venv}")
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


@contextlib.contextmanager
def extension_wait_limit(limit_s: float = EXTENSION_WAIT_S):
    """Around calls that may JIT-build an extension: past ``limit_s`` the wait (torch's lock
    loop sleeps in Python) is interrupted with :class:`ExtensionLockTimeout` naming the locks.
    A no-op off the main thread, where no alarm can be delivered."""
    if threading.current_thread() is not threading.main_thread() or limit_s <= 0:
        yield
        return
    folder = private_extension_dir()

    def expire(signum, frame):
        locks = sorted(str(p) for p in folder.glob("*/lock")) or [f"none under {folder}"]
        raise ExtensionLockTimeout(
            f"an extension build waited {limit_s:.0f} s on its lock ({', '.join(locks)}): a "
            "build killed mid-way leaves it; delete it if no build runs (GALA_EXTENSION_WAIT_S "
            "sets the limit)"
        )

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def build_extensions() -> None:
    """Build DeepSpeed's JIT op for this machine's accelerator (the CPU's shared-memory
    collective; none with CUDA) in :func:`private_extension_dir`, within the lock-wait limit:
    done once before many launches, no launch is killed mid-build (which leaves the lock)."""
    private_extension_dir()
    with extension_wait_limit():
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()


def make_accelerator(cfg: RunConfig):
    """Accelerate on GPU (NCCL, bf16) or CPU (gloo), with DeepSpeed when the launcher asks."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = use_cuda(cfg)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    private_extension_dir()
    kwargs = {
        "mixed_precision": precision(cfg),
        "step_scheduler_with_optimizer": False,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
    }
    if deepspeed:
        # DeepSpeed takes accumulation from its own config (set in configure_deepspeed).
        del kwargs["gradient_accumulation_steps"]
    kwargs |= _tracker(cfg)
    if not cuda and deepspeed:
        # cpu=True would silently turn DeepSpeed into plain DDP; gloo keeps DeepSpeed on CPU.
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    elif not cuda:
        kwargs["cpu"] = True  # without it each CPU process would run alone, undistributed
    with extension_wait_limit() if deepspeed else contextlib.nullcontext():
        return Accelerator(**kwargs)  # DeepSpeed's communication op builds here


def _tracker(cfg: RunConfig) -> dict:
    """Accelerate's keywords for ``train.tracker``; one not installed is a config error
    (Accelerate itself would drop it without a word)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    name = cfg.train.tracker
    if name == "none":
        return {}
    if LoggerType(name) not in get_available_trackers():
        raise ConfigError(f"train.tracker: {name!r} is not installed here (pip install {name})")
    return {"log_with": name, "project_dir": cfg.run_dir}


def configure_deepspeed(accelerator, cfg: RunConfig) -> None:
    """Fill the DeepSpeed config before ``prepare``: batch sizes and the precision mode."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    # Our loaders are not torch DataLoaders, so DeepSpeed's "auto" batch sizes are set here.
    accum = cfg.train.grad_accum_steps
    ds["gradient_accumulation_steps"] = accum
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size // accelerator.num_processes
    ds["train_batch_size"] = cfg.data.batch_size * accum
    if precision(cfg) == "bf16":
        # Accelerate then reports mixed_precision "no" under DeepSpeed (it reads the bf16 key).
        ds["bf16"] = {"enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}


def check_world(accelerator) -> None:
    """Fail loudly when the launcher started N processes but they do not see each other."""
    if (
        "WORLD_SIZE" not in os.environ
        and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        and "MASTER_ADDR" in os.environ
    ):
        raise ConfigError(
            "`accelerate launch --cpu` starts one process whatever --num_processes says. "
            "For one process run `python -m gala_scale.train`; for N processes on CPU run "
            "`accelerate launch --multi_gpu --num_processes N` (configs/accelerate/cpu_2proc.yaml)."
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"the launcher started {launched} processes (WORLD_SIZE) but this one runs "
            f"with {accelerator.num_processes}: the run would train {launched} separate models. "
            "On CPU launch with `accelerate launch --multi_gpu --num_processes N` "
            "(see configs/accelerate/); `--cpu` and `distributed_type: MULTI_CPU` start it alone."
        )


def check_shared_run_dir(run_dir: Path, device: torch.device) -> None:
    """Every rank must see what rank 0 writes into ``run_dir`` (checkpoints are written by all
    ranks and read back by all). A node-local path on a multi-node job is a clear error here,
    not a resume that silently restarts from scratch on some nodes."""
    if dist.world_size() == 1:
        return
    name = f".shared-check-{uuid.uuid4().hex}" if dist.rank() == 0 else None
    if name is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / name).write_text(socket.gethostname())
    # Each rank looks in its own run_dir: the same path may name another folder on another node.
    probe = Path(run_dir) / dist.broadcast_object(name)
    missing = torch.tensor([0.0 if probe.is_file() else 1.0], device=device)
    missing = int(dist.all_reduce_sum_(missing).item())
    if dist.rank() == 0:
        probe.unlink()
    if missing:
        raise ConfigError(
            f"run_dir: {Path(run_dir).resolve()} is not shared by all nodes ({missing} "
            f"of {dist.world_size()} ranks cannot see a file rank 0 wrote there on "
            f"{socket.gethostname()}); put the run directory on a filesystem every node mounts"
        )


def agreed_resume_point(run_dir: Path, resume: str) -> Path | None:
    """Rank 0 chooses the checkpoint (``--resume``) and every rank takes its answer: ranks that
    each list a shared filesystem can disagree while a checkpoint is being renamed."""
    try:
        answer = (resume_point(run_dir, resume), None) if dist.rank() == 0 else None
    except ValueError as err:
        answer = (None, str(err))
    where, problem = dist.broadcast_object(answer)
    if problem:
        raise ConfigError(problem)
    return where


class Guard:
    """Stop signals and non-finite losses, agreed by every rank in one small all-reduce.

    SIGTERM / SIGUSR1 only set a flag. ``watch(loss)`` keeps a device-side "non-finite seen"
    flag without reading anything back. ``check(value)`` all-reduces (stop, non-finite, value)
    and reads them with one device-to-host copy: the only sync point of a training step, run
    every ``train.log_every`` steps, so a stop lags the signal by at most that many steps.

    The handlers stay until :meth:`close` (or the end of a ``with`` block) puts the previous
    ones back: a process forked meanwhile inherits them, and a SIGTERM meant to end it would
    only set a flag there.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: int | None = None
        self.device = torch.device("cpu")
        self._bad: torch.Tensor | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def watch(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss)).float()
        self._bad = bad if self._bad is None else torch.maximum(self._bad, bad)

    def check(self, value: torch.Tensor | float = 0.0) -> tuple[bool, float]:
        """(stop requested on any rank, ``value`` summed over ranks / world); a collective.

        Raises :class:`NonFiniteLoss` on every rank when any rank's watched loss was not finite.
        """
        flags = torch.zeros(3, device=self.device)
        if self.signal:
            flags[0] = 1.0  # a fill, not a host-to-device copy: no sync
        if self._bad is not None:
            flags[1] = self._bad
        flags[2] = value
        stop, bad, total = dist.all_reduce_sum_(flags).tolist()  # note: the one sync point
        if bad:
            raise NonFiniteLoss(
                f"the training loss became NaN or infinite on {int(bad)} of {dist.world_size()} "
                "rank(s); every rank stops. Lower the learning rate or check the data "
                "(python -m gala_scale.shards verify)."
            )
        return stop > 0, total / dist.world_size()

    def stop_requested(self) -> bool:
        return self.check()[0]
