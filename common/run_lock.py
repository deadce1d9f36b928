"""One writer per run directory: a lock held for the run's whole life by the process that writes.

Two starts of one run (the same command twice, a rerun of a sweep whose old child still trains,
torchrun workers left by a killed launcher) would otherwise interleave their metrics, double
their events and overwrite each other's checkpoints without a word. The writer (rank 0) takes
`RUN_DIR/run.lock` before it writes anything and keeps it until it returns; a second start is
refused with one line naming the holder.

What the lock relies on: `fcntl.flock`, which the kernel drops when the holder dies, however it
dies, so a lock left by a dead process is never in the way (its note is overwritten, and the
takeover said). On NFS, Linux maps flock onto the server's byte-range locks (NFSv4, or NFSv3
with lockd), so the lock holds across the hosts of a SLURM cluster; a mount with `nolock` makes
it local to each host. For that case the holder also writes its host and refreshes the note's
time every `HEARTBEAT_S`: a note from another host refreshed within `STALE_S` is refused even
when flock granted the lock, and an older one is taken over as stale.
"""

import fcntl
import json
import os
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 4 * HEARTBEAT_S


class RunLockError(RuntimeError):
    """Another process is writing this run; the message is one line naming it."""


class RunLock:
    """`RUN_DIR/run.lock`, held from `acquire()` to `release()` (or the process's end)."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.heartbeat_s = heartbeat_s
        self._file: IO[str] | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.took_over: dict[str, Any] | None = None  # the stale note found, if any

    def acquire(self) -> "RunLock":
        """Take the lock or raise `RunLockError`; never truncates another holder's note."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # held open for the run's life: closing it unlocks
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_note(self.path)
            file.close()
            raise RunLockError(f"{self.path.parent} {describe(holder)}") from None
        previous = read_note(self.path)  # a release empties it: a note left means a dead holder
        if _alive_elsewhere(previous):
            file.close()
            raise RunLockError(f"{self.path.parent} {describe(previous)}")
        self.took_over = previous or None
        self._file = file
        self._write_note()
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
        self._beat.start()
        return self

    def takeover_note(self) -> str | None:
        """The line that says this lock was taken over from a holder that died, if it was."""
        stale = self.took_over
        if not stale:
            return None
        return (
            f"run lock: took over from PID {stale.get('pid')} on {stale.get('host')}, which "
            "ended without releasing it"
        )

    def release(self) -> None:
        """Give the lock up, its note emptied; the file stays (removing it would let a waiter
        lock an inode no later start can see)."""
        if self._file is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        self._file.truncate(0)
        self._file.close()  # drops the flock
        self._file = None

    def _write_note(self) -> None:
        note = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now().isoformat(timespec="seconds"),
        }
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(note) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:  # a full or vanished disk: the run's own writes will say so
                pass


def read_note(path: Path) -> dict[str, Any]:
    """The holder's note ({} when there is none, or it is empty or unreadable), with the file's
    mtime as its last heartbeat."""
    try:
        note = json.loads(Path(path).read_text())
        note["heartbeat"] = Path(path).stat().st_mtime
    except (OSError, ValueError, TypeError):
        return {}
    return note if isinstance(note, dict) else {}


def describe(holder: dict[str, Any]) -> str:
    """'is being written by PID 123 on host-a since 2026-12-06T23:40:00: ...' (one line)."""
    who = f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}"
    since = f" since {holder['started']}" if holder.get("started") else ""
    return (
        f"is being written by {who}{since}: wait for that run to end, or stop it, "
        "before starting this run again"
    )


def _alive_elsewhere(note: dict[str, Any]) -> bool:
    """A note from another host whose heartbeat is recent: its flock may not reach this host."""
    if not note or note.get("host") == socket.gethostname():
        return False
    return time.time() - float(note.get("heartbeat", 0.0)) < STALE_S
