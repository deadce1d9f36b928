"""Turn the signals a scheduler sends before preemption or a time limit, and Ctrl-C, into a
save-and-exit."""

import signal
import threading
import warnings
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

# SLURM sends SIGTERM at preemption and, with `--signal`, SIGUSR1 before the time limit;
# SIGINT is Ctrl-C (a second one interrupts at once, without saving).
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionFlag:
    """Set by a preemption signal; the loop saves a checkpoint at the next step boundary.

    Signals reach ranks at different moments (torchrun forwards them one by one, SLURM's reach
    each node when they do), so `requested` is agreed on by all ranks: one rank seeing a signal
    stops them all at the same step, which the collective save needs.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._signum = 0
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("not in the main thread: preemption signals go uncaught", stacklevel=2)
            return self
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user will not wait for the save
        self._signum = signum
        self.signal_name = signal.Signals(signum).name

    @property
    def by_user(self) -> bool:
        """Whether the agreed signal is Ctrl-C (the run is `stopped`, not `preempted`)."""
        return self.signal_name is not None and self.signal_name.startswith("SIGINT")

    @property
    def requested(self) -> bool:
        """Whether any rank got a signal; a collective, so every rank must ask at each step.

        One all-reduce of one number per step: on the GPU a host sync, like the update gate's.
        """
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self._signum != 0
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        signum = torch.tensor([self._signum], dtype=torch.int64, device=device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        agreed = int(signum.item())  # host sync
        if agreed and self.signal_name is None:
            self.signal_name = f"{signal.Signals(agreed).name} (on another rank)"
        return agreed != 0
