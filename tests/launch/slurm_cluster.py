"""A real one-node SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) for tests.

Follows /work/shared/reference/slurm.md: every daemon runs in the foreground under Popen on a
free port with its state in a temporary directory, so nothing touches the system's config, and
the accounting daemon is there because submitit reads job states from `sacct`.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd")
CLIENTS = ("sinfo", "sbatch", "srun", "scontrol", "scancel", "sacct", "squeue")


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def missing_requirements() -> str | None:
    """Why a cluster cannot start here, or None when it can."""
    if os.geteuid() != 0:
        return "the SLURM test cluster runs its daemons as root"
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None]
    if missing:
        return f"SLURM/munge/MariaDB binaries missing: {', '.join(missing)}"
    return None


def _available_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 4096


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env` holds what clients and jobs need."""

    def __init__(self, root: Path, partition: str = "debug") -> None:
        self.root = root
        self.partition = partition
        self.host = socket.gethostname().split(".")[0]
        self.cpus = len(os.sched_getaffinity(0))  # what `nproc` says
        # munged wants o+x on every parent of its socket and sun_path is < 108 bytes, while
        # pytest's tmp dirs are 0700 and deep: the socket lives in its own short 0755 dir.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="munge-", dir="/tmp"))
        self.munge_dir.chmod(0o755)
        self.munge_socket = self.munge_dir / "sock"
        self.conf = root / "etc" / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list = []

    # --------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        env = {**os.environ, **self.env}
        self._procs[name] = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def _wait_for(self, what: str, check, timeout_s: float, name: str | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            if name is not None and self._procs[name].poll() is not None:
                break
            time.sleep(0.25)
        raise RuntimeError(f"{what} did not come up in {timeout_s:.0f} s\n{self.logs()}")

    @staticmethod
    def _port_open(port: int) -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def logs(self, tail_lines: int = 15) -> str:
        """The last lines of every daemon's log, for error messages."""
        out = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail_lines:]
            out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def run(self, *argv: str, timeout_s: float = 30) -> str:
        """Run a SLURM client command against this cluster and return its stdout."""
        return subprocess.run(
            list(argv),
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout

    # --------------------------------------------------------------------------------------

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            "munged",
            [
                "munged",
                "-F",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.munge_dir / 'pid'}",
                f"--seed-file={self.munge_dir / 'seed'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
            ],
        )
        self._wait_for("munged", self.munge_socket.exists, 20, "munged")

    def _start_mariadb(self) -> None:
        datadir = self.root / "mysql"
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                "--user=root",
                f"--datadir={datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True,
            check=True,
            timeout=120,
        )
        self.db_port = free_port()
        self._spawn(
            "mariadbd",
            [
                "mariadbd",
                "--no-defaults",
                "--user=root",
                f"--datadir={datadir}",
                f"--port={self.db_port}",
                "--bind-address=127.0.0.1",
                f"--socket={self.root / 'mysql.sock'}",
                f"--pid-file={self.root / 'run' / 'mariadbd.pid'}",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=8M",
            ],
        )
        self._wait_for("mariadbd", lambda: self._port_open(self.db_port), 60, "mariadbd")

    def _write_configs(self) -> None:
        self.ctld_port, self.slurmd_port, self.dbd_port = free_port(), free_port(), free_port()
        state, spool, run, log = (self.root / d for d in ("state", "spool", "run", "log"))
        auth = f"socket={self.munge_socket}"
        dbd_conf = self.conf.parent / "slurmdbd.conf"
        dbd_conf.write_text(
            "\n".join(
                [
                    "AuthType=auth/munge",
                    f"AuthInfo={auth}",
                    f"DbdHost={self.host}",
                    "DbdAddr=127.0.0.1",
                    f"DbdPort={self.dbd_port}",
                    "SlurmUser=root",
                    f"LogFile={log / 'slurmdbd.log'}",
                    f"PidFile={run / 'slurmdbd.pid'}",
                    "StorageType=accounting_storage/mysql",
                    "StorageHost=127.0.0.1",
                    f"StoragePort={self.db_port}",
                    "StorageUser=root",
                    "StorageLoc=slurm_acct_db",
                    "",
                ]
            )
        )
        dbd_conf.chmod(0o600)
        memory_mb = max(512, int(_available_memory_mb() * 0.9))
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=pytest",
                    f"SlurmctldHost={self.host}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"SlurmctldPort={self.ctld_port}",
                    f"SlurmdPort={self.slurmd_port}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # A requeued job otherwise waits ~120 s for its old credential to expire.
                    f"AuthInfo={auth},cred_expire=5",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "MpiDefault=none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerParameters=sched_interval=2,bf_interval=1",
                    "MailProg=/bin/true",
                    "KillWait=5",
                    "ReturnToService=2",
                    "MinJobAge=60",
                    f"StateSaveLocation={state}",
                    f"SlurmdSpoolDir={spool}",
                    f"SlurmctldPidFile={run / 'slurmctld.pid'}",
                    f"SlurmdPidFile={run / 'slurmd.pid'}",
                    f"SlurmctldLogFile={log / 'slurmctld.log'}",
                    f"SlurmdLogFile={log / 'slurmd.log'}",
                    "AccountingStorageType=accounting_storage/slurmdbd",
                    "AccountingStorageHost=127.0.0.1",
                    f"AccountingStoragePort={self.dbd_port}",
                    # Without it slurmctld asks the default munge socket and dies.
                    f"AccountingStoragePass={self.munge_socket}",
                    f"NodeName={self.host} CPUs={self.cpus} RealMemory={memory_mb} State=UNKNOWN",
                    f"PartitionName={self.partition} Nodes={self.host} Default=YES "
                    "MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def start(self, timeout_s: float = 120) -> "SlurmCluster":
        """Bring every daemon up and wait until the node is idle."""
        for sub in ("etc", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._start_mariadb()
            self._write_configs()
            self._spawn("slurmdbd", ["slurmdbd", "-D"])
            self._wait_for("slurmdbd", lambda: self._port_open(self.dbd_port), 60, "slurmdbd")
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            self._wait_for("the node", self._node_idle, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _node_idle(self) -> bool:
        try:
            states = self.run("sinfo", "-h", "-N", "-o", "%t", timeout_s=10).split()
        except (subprocess.SubprocessError, OSError):
            return False
        return bool(states) and all(state == "idle" for state in states)

    # --------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel every job, then stop the daemons from the top: slurmd first, munged last."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--full", "--user=root", timeout_s=15)
                time.sleep(1)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                # slurmd may hang once its controller is gone; its job steps go with the group.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for log in self._logs:
            log.close()
        self._logs.clear()
        shutil.rmtree(self.munge_dir, ignore_errors=True)
