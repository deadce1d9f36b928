"""Train a GPT-2 through DeepSpeed ZeRO, watching for loss divergences.

    python train.py                                        # default config: small GPT, CPU
    python train.py configs/gpt2_owt.yaml optim.weight_decay=0.3 precision=bf16
    torchrun --nproc-per-node 8 train.py configs/gpt2_owt.yaml  # one node, 8 ranks
    python -m launch.slurm configs/gpt2_owt.yaml --nodes 4 --gpus-per-node 8  # SLURM

Everything a run writes lands in <run.out_dir>/<run.name>/ (docs/run_directory.md). The run
itself is `trainer.run`, under `heal.run` (which acts on a divergence stop: a diagnosis, or
with `divergence.policy=heal` the heals); this file is the command line around it.
"""

import os
import sys
import traceback

from checkpoint.manager import CheckpointError
from common.run_lock import RunLockError
from configs import ConfigError, key_table, load_config
from data.dataset import DataError
from heal import run
from launch.distributed import close_distributed, lost_peer_error, say_lost

USAGE = """python train.py [CONFIG.yaml] [section.key=value ...]

CONFIG.yaml defaults to configs/default.yaml; the keys below override it. Running the same
command again resumes the run from its latest checkpoint (a finished run: nothing to do)."""


def main(argv: list[str] | None = None) -> int:
    """CLI: `train.py [CONFIG.yaml] [section.key=value ...]`; bad input is a one-line error.

    Exit status: 0 completed (or stopped by the divergence policy, or preempted and saved),
    2 a config, data or checkpoint the user must fix, or a run another process is writing,
    130 Ctrl-C, 1 anything else. Any other exception on any rank is reported as
    `rank N: Type: message` after its traceback, so that with several ranks the log says which
    one failed; the launcher (torchrun, srun) then stops the others. A collective that failed
    because a peer is gone is one line naming the lost rank.
    """
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(f"{__doc__.strip()}\n\nusage: {USAGE}\n\n{key_table()}")
        return 0
    path = args[0] if args and "=" not in args[0] else None
    overrides = args[1:] if path is not None else args
    try:
        cfg = load_config(path, overrides)
        summary = run(cfg)  # and after a divergence stop: its diagnosis, or its heals
        close_distributed()
    except (ConfigError, CheckpointError, DataError, RunLockError) as err:
        print(f"{_rank_prefix()}error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the loop, or twice: nothing was saved
        print(f"{_rank_prefix()}error: interrupted before a checkpoint was saved", file=sys.stderr)
        return 130
    except Exception as err:
        lost = lost_peer_error(err)  # a collective that failed because a peer is gone
        if lost is not None:
            say_lost(lost)  # unless the heartbeat's watch said it first
            return 1
        traceback.print_exc()
        rank = os.environ.get("RANK", "0")
        print(f"rank {rank}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if summary["status"] == "stopped":  # Ctrl-C, saved: a shell's `&&` chain stops too
        return 130
    return 0 if summary["status"] in ("completed", "preempted", "diverged") else 1


def _rank_prefix() -> str:
    """`rank N: ` when several ranks may print the same kind of line, else nothing."""
    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
