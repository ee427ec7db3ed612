"""Facts of this machine and process that several commands need: a free TCP port, peak memory.

One helper each, used by the trainer, the benchmarks, quickstart, rehearse and the tests.
"""

from __future__ import annotations

import resource
import socket
from collections.abc import Iterable
from pathlib import Path

_handed_out: set[int] = set()


def free_port(candidates: Iterable[int] | None = None) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now.

    Without ``candidates`` the kernel chooses one (an ephemeral port). With them, the first one
    that binds and that this process has not handed out before: callers that start servers
    concurrently (test workers) pass disjoint blocks outside the ephemeral range, so no two of
    them are given the same port between its release here and the child's bind.
    """
    for port in [0] if candidates is None else candidates:
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = sock.getsockname()[1]
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port among {candidates}")


def peak_rss_mib(children: bool = False, pid: int | None = None) -> float:
    """Peak resident set size in MiB: of this process, of its largest waited-for child
    (``children=True``), or of the running process ``pid`` (its VmHWM; nan when it is gone)."""
    if pid is not None:
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            return float("nan")
        hwm = [line.split()[1] for line in status if line.startswith("VmHWM:")]
        return int(hwm[0]) / 1024 if hwm else float("nan")
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


__all__ = ["free_port", "peak_rss_mib"]
