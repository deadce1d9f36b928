"""A child process that must not outlive the one that started it.

A sweep's `train.py` child, or a torchrun worker, whose parent is killed (even by SIGKILL,
which no handler sees) would otherwise train on unwatched, and a rerun would start a second
writer beside it. Linux delivers a chosen signal to a process when its parent dies
(`PR_SET_PDEATHSIG`); the harness asks for SIGTERM, which its training loop answers by saving
and stopping. Elsewhere this does nothing, and the run lock keeps such an orphan harmless.
"""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def signal_on_parent_death(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `signum` to this process when its parent dies; True if it will.

    Safe in a `preexec_fn` (it only calls prctl). If the parent is already gone by the time the
    request is made, the signal is sent at once, as it would have been.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the request: the kernel will not tell
        os.kill(os.getpid(), signum)
    return True
