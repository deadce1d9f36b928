"""Process-group setup shared by `python train.py`, torchrun and SLURM jobs, and telling which
peer was lost when a collective fails.

A rank that dies or hangs leaves the others in a collective until the process group's timeout
(`run.collective_timeout_s`); a dead one's sockets close, which gloo reports at once. Either
way the error says nothing about which rank is gone, so every rank of a multi-rank run ticks a
heartbeat counter in the rendezvous store from a thread, and a rank whose collective failed
looks for the counters that stopped.
"""

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed.distributed_c10d as c10d

from common.process import signal_on_parent_death
from configs import ConfigError

HEARTBEAT_S = 1.0  # seconds between heartbeat ticks
PROBE_S = 4 * HEARTBEAT_S  # how long a failed rank watches the counters
WATCH_S = 5.0  # seconds between a watching rank's reads of its peers' counters (one request)
STORE_TIMEOUT = timedelta(seconds=10)  # the heartbeat's store client gives up after this


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pick_device(preference: str) -> torch.device:
    """This rank's device: `cuda:LOCAL_RANK` when it sees all of the node's GPUs (torchrun,
    `srun --gpus-per-node`), `cuda:0` when it sees one (`srun --gpus-per-task=1`)."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is visible (use run.device=cpu)")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    index = local_rank if count > 1 else 0
    if index >= count:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this process sees {count} CUDA devices "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
            "start one rank per GPU"
        )
    return torch.device("cuda", index)


def init_distributed(preference: str, collective_timeout_s: float | None = None) -> DistEnv:
    """Join (or, alone, create) the process group: gloo on the CPU, nccl on GPUs.

    `python train.py` with no launcher gets a one-rank group on a free local port, so the code
    path is the same for one rank and many. `collective_timeout_s` bounds every collective and
    the rendezvous (None: torch's default); with several ranks the heartbeat starts. A
    torchrun worker asks for SIGTERM when its launcher dies (`common.process`): killed with
    `kill -9`, torchrun cannot stop its workers, which then save and stop by themselves.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: stop with the launcher
        signal_on_parent_death()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    device = pick_device(preference)
    # DeepSpeed picks its accelerator at import time; it must agree with our device.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        timeout = {}
        if collective_timeout_s is not None:
            timeout["timeout"] = timedelta(seconds=collective_timeout_s)
            # DeepSpeed makes its groups (ZeRO's copy of the world among them) with new_group
            # and no timeout, which falls back to these module defaults (30 minutes for gloo)
            c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout["timeout"]
        backend = "nccl" if device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **timeout)
        if int(os.environ["WORLD_SIZE"]) > 1:
            _heartbeat.start(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    return DistEnv(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        device=device,
    )


def close_distributed() -> None:
    """Leave the process group together: a rank exiting with gloo's threads still running can
    abort in C++ ("terminate called without an active exception") and fail its launcher."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        _heartbeat.leave()
        torch.distributed.destroy_process_group()


class Heartbeat:
    """This rank's counter `wdharness/heartbeat/<rank>` in the rendezvous store (the TCPStore at
    MASTER_ADDR:MASTER_PORT, hosted by rank 0 or its torchrun agent), ticked by a daemon thread.

    A rank that stops ticking without having set `wdharness/left/<rank>` (which a rank does when
    it leaves, cleanly or after a failure) died, hangs or lost its node.
    """

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1
        self._store: torch.distributed.TCPStore | None = None
        self._stop = threading.Event()
        self._watch: tuple[float, Callable[[str], None]] | None = None
        self.said: str | None = None  # the lost-peer line this process printed (`say_lost`)

    def start(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self._store = torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=STORE_TIMEOUT,
        )
        self._store.add(self._key("heartbeat", rank), 1)
        threading.Thread(target=self._tick, name="heartbeat", daemon=True).start()

    def _key(self, kind: str, rank: int) -> str:
        return f"wdharness/{kind}/{rank}"

    def watch(self, silent_s: float, on_lost: Callable[[str], None]) -> None:
        """From now on, report a peer whose counter stood still for `silent_s` (and that did not
        leave), or a store that went away, once: `say_lost(line)` and `on_lost(line)` from the
        heartbeat thread, with the line `lost_peer_error` would give.

        Under NCCL a collective waiting on a lost peer is aborted by NCCL's watchdog at the
        timeout, with no exception for `lost_peer_error` to see: this is the run's one chance
        to say which rank was lost and to record it. `silent_s` must stay below the timeout.
        """
        self._watch = (silent_s, on_lost)

    def unwatch(self) -> None:
        self._watch = None

    def _tick(self) -> None:
        seen: dict[int, tuple[int, float]] = {}  # peer -> (counter, when it last moved)
        last_read = time.monotonic()
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._store.add(self._key("heartbeat", self.rank), 1)
                if self._watch is not None and time.monotonic() - last_read >= WATCH_S:
                    last_read = time.monotonic()
                    self._check(seen, *self._watch)
            except RuntimeError:  # the store is gone (torch's DistError is a RuntimeError)
                if self._watch is not None:
                    silent_s, on_lost = self._watch
                    self._lost(lost_line(self.rank, None, silent_s), on_lost)
                return

    def _check(
        self, seen: dict[int, tuple[int, float]], silent_s: float, on_lost: Callable[[str], None]
    ) -> None:
        """One read of every peer's counter; report the ones silent for `silent_s`."""
        peers = [r for r in range(self.world_size) if r != self.rank]
        counts = self._store.multi_get([self._key("heartbeat", r) for r in peers])
        now = time.monotonic()
        for peer, count in zip(peers, map(int, counts), strict=True):
            if seen.get(peer, (None,))[0] != count:
                seen[peer] = (count, now)
        silent = [r for r in peers if now - seen[r][1] >= silent_s]
        lost = [r for r in silent if not self._store.check([self._key("left", r)])]
        if lost:
            self._lost(lost_line(self.rank, lost, silent_s), on_lost)

    def _lost(self, line: str, on_lost: Callable[[str], None]) -> None:
        """Say the line and hand it to the watcher, once."""
        self._watch = None
        say_lost(line)
        on_lost(line)

    def lost_ranks(self) -> list[int] | None:
        """The peers whose counter stood still for PROBE_S and who did not leave; None when the
        store itself is unreachable (the node hosting it, rank 0's, is gone)."""
        if self._store is None:
            return []
        peers = [r for r in range(self.world_size) if r != self.rank]
        try:
            before = [self._store.add(self._key("heartbeat", r), 0) for r in peers]
            time.sleep(PROBE_S)
            after = [self._store.add(self._key("heartbeat", r), 0) for r in peers]
            left = [self._store.check([self._key("left", r)]) for r in peers]
        except RuntimeError:
            return None
        return [
            r
            for r, b, a, gone in zip(peers, before, after, left, strict=True)
            if a == b and not gone
        ]

    def leave(self, wait_s: float = 0.0) -> None:
        """Stop ticking and say so. Rank 0, whose process may host the store, first waits up
        to `wait_s` for the other ranks to leave, so that they can still read it."""
        if self._store is None:
            return
        self._stop.set()
        try:
            self._store.set(self._key("left", self.rank), "1")
            if self.rank == 0 and wait_s > 0:
                lost = set(self.lost_ranks() or [])
                others = [self._key("left", r) for r in range(1, self.world_size) if r not in lost]
                self._store.wait(others, timedelta(seconds=wait_s))
        except RuntimeError:
            pass
        self._store = None


_heartbeat = Heartbeat()


def lost_peer_error(err: BaseException) -> str | None:
    """After `err` on a rank of a multi-rank run: a one-line error naming the lost peer(s), or
    None when no peer is lost (`err` is then this rank's own failure). Either way this rank
    then leaves, so that the ranks still probing do not count it as lost."""
    if _heartbeat.world_size < 2:
        return None
    lost = _heartbeat.lost_ranks() if isinstance(err, RuntimeError) else []
    _heartbeat.leave(wait_s=2 * PROBE_S)
    return lost_line(_heartbeat.rank, lost, PROBE_S) if lost != [] else None


def lost_line(rank: int, lost: list[int] | None, silent_s: float) -> str:
    """The one-line error of `rank` for the `lost` peers (None: the store is unreachable)."""
    if lost is None:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        return (
            f"rank {rank}: error: lost rank 0 (the rendezvous store at {where} is "
            "unreachable: its process or node is gone); rerun to resume from the last checkpoint"
        )
    return (
        f"rank {rank}: error: lost rank {', '.join(map(str, lost))} (no heartbeat for "
        f"{silent_s:.0f} s: the process died or hangs, or its node is gone); rerun to resume "
        "from the last checkpoint"
    )


def say_lost(line: str) -> None:
    """Print a lost-peer line on stderr, the first one only: the heartbeat's watch may have said
    it before the failed collective raised (gloo), or before an abort (NCCL)."""
    if _heartbeat.said is None:
        _heartbeat.said = line
        print(line, file=sys.stderr, flush=True)


def watch_peers(silent_s: float, on_lost: Callable[[str], None]) -> None:
    """`Heartbeat.watch` of this process's heartbeat (a no-op on one rank)."""
    _heartbeat.watch(silent_s, on_lost)


def unwatch_peers() -> None:
    _heartbeat.unwatch()
