"""Training runs shared by the checkpoint tests, each made once per session and only on demand.

For a (ZeRO stage, world size, optim.name) the runs are: `reference` (uninterrupted), `cut`
(interrupted by a signal, then resumed to the end) and `cut_copy` (the interrupted run directory
as the signal left it, for the tests that resume it elsewhere: another world size, damaged
checkpoints).
adam_spd runs start (`checkpoint.init_from`) from step 6 of the adamw reference of their stage.
"""

import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.checkpoint import runs

# One stage per world size takes SIGTERM (save and exit as "preempted"); the rest SIGKILL.
SIGNALS = {(2, 1): signal.SIGTERM, (1, 2): signal.SIGTERM}


@dataclass
class RunSet:
    reference: Path
    cut: Path
    cut_copy: Path
    signal: signal.Signals
    returncode: int  # of the interrupted process
    signalled_at: int  # the last step logged when the signal was sent


class Runs:
    """Makes and remembers the run sets; in this process on one rank, torchrun on two."""

    def __init__(self, root: Path):
        self.root = root
        self.sets: dict[tuple[int, int, str], RunSet] = {}

    def get(self, zero_stage: int, world_size: int = 1, form: str = "adamw") -> RunSet:
        key = (zero_stage, world_size, form)
        if key not in self.sets:
            self.sets[key] = self._make(zero_stage, world_size, form)
        return self.sets[key]

    def _make(self, zero_stage: int, world_size: int, form: str) -> RunSet:
        from checkpoint.export import find_checkpoint

        extra: dict[str, object] = {"optim.name": form, **runs.VARIANTS.get(form, {})}
        if form != "adamw":
            extra.update(runs.FORM_EXTRA)
        if form == "adam_spd":
            source = self.get(zero_stage, world_size).reference
            extra["checkpoint.init_from"] = find_checkpoint(source, 6)
            extra["optim.weight_decay"] = 0.5
        name = f"zero{zero_stage}_ranks{world_size}_{form}"
        reference, cut = self.root / f"{name}_reference", self.root / f"{name}_cut"
        sig = SIGNALS.get((zero_stage, world_size), signal.SIGKILL)
        interrupted = runs.Interrupted(cut, zero_stage, world_size, sig, zero_stage, **extra)
        # meanwhile: the two share the cores, not the numbers
        self._train(reference, zero_stage, world_size, extra)
        returncode, step = interrupted.wait()
        cut_copy = self.root / f"{name}_cut_copy"
        shutil.copytree(cut, cut_copy)
        self._train(cut, zero_stage, world_size, extra)
        return RunSet(reference, cut, cut_copy, sig, returncode, step)

    @staticmethod
    def _train(run_dir: Path, zero_stage: int, world_size: int, extra: dict[str, object]) -> None:
        if world_size == 1:
            assert runs.run_here(run_dir, zero_stage, **extra)["status"] == "completed"
            return
        result = runs.train(run_dir, zero_stage, world_size, **extra)
        assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="session")
def training_runs(tmp_path_factory: pytest.TempPathFactory, dist_env) -> Runs:
    return Runs(tmp_path_factory.mktemp("checkpoint_runs"))
