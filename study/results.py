"""The typed results of a study: what study.claims computes and study.report writes to claims.json.

Each class is one object of claims.json, its fields in the file's key order, so a misspelt key
is an AttributeError where it is made rather than a KeyError when a report is written. `to_json`
is the one way into the file: the JSON keys are the field names, and a field marked
OMIT_IF_NONE is left out while it is None (claims.json has never held such a key as null).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

import numpy as np

from study.stats import Comparison, Stat

REPRODUCED: Final = "reproduced"
NOT_REPRODUCED: Final = "not reproduced"
CANNOT_TELL: Final = "cannot tell"
Verdict = Literal["reproduced", "not reproduced", "cannot tell"]
_OMIT = "omit_if_none"
OMIT_IF_NONE: Final = {_OMIT: True}  # field metadata, read by to_json

G = TypeVar("G")


class Judged(Protocol):
    """Anything with a verdict and its reason: a claim's group, or a Finding about one part."""

    @property
    def verdict(self) -> Verdict: ...

    @property
    def reason(self) -> str: ...


@dataclass(frozen=True)
class Finding:
    """A verdict and its reason on one part of claim 1 (mechanism, order), overall or per group."""

    verdict: Verdict
    reason: str


# --- claim 1 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One row of claim 1's table: an (optimizer, λ) arm's statistics over its seeds."""

    optimizer: str
    weight_decay: float
    runs: int
    left_out: int  # runs with no final loss (they blew up), out of the statistics below
    final_loss: Stat
    final_val_loss: Stat
    loss: Stat  # what the verdict compares: final_val_loss or final_loss (claims.verdict_loss)
    val_gap_to_floor: Stat
    mid_loss: Stat
    mid_val_loss: Stat
    param_norm_decay: Stat
    eff_lr_decay: Stat
    adam_eff_lr: Stat
    final_vs_baseline: Comparison  # `loss` minus the no-decay arm's


@dataclass(frozen=True)
class Claim1Group:
    """Claim 1 in one group of runs: its arms, its verdict, and the findings on its two parts."""

    group: str
    verdict: Verdict
    reason: str
    arms: list[Arm]
    baseline: Stat  # the no-decay arm's `loss`
    loss_name: str  # "final validation loss" or "final train loss": what `loss` holds
    mechanism: Finding
    order: Finding


@dataclass(frozen=True)
class Claim1:
    """Claim 1 over all groups, with its two parts (mechanism, order) combined the same way."""

    title: str
    groups: list[Claim1Group]
    verdict: Verdict
    reason: str
    mechanism: Finding
    order: Finding


# --- claim 2 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """What a flagged run logged in the window before its first divergence."""

    run: str
    path: str
    blew_up: bool
    kind: str  # the first detection's kind, or "status diverged" where there was none
    metric: str | None
    value: float | str | None  # as the event recorded it ("nan" stays a string)
    step: int | None
    source: str  # "event evidence" or "metrics.jsonl"
    window: tuple[int | None, int | None] | None  # first and last step of the records read
    attn_logit_max: float
    attn_logit_max_step: int | None
    attn_logit_max_layer: int | None
    log_z_last: float
    log_z_max_abs: float


@dataclass(frozen=True)
class Cell:
    """One (precision, λ) cell of claim 2: how many runs were flagged or blew up, and when."""

    precision: str
    weight_decay: float
    runs: int
    flagged: int
    blew_up: int
    status_diverged: int
    runs_with: dict[str, int]  # detection kind -> runs with at least one such detection
    events: dict[str, int]  # detection kind -> detections
    first_divergence_steps: list[int]  # of the flagged runs
    blew_up_steps: list[int]
    first_divergence_step: Stat
    first_divergence_fraction: Stat
    max_steps: float


@dataclass(frozen=True)
class Controls:
    """Claim 2's verdict against each control of bf16 λ=0: fp32 λ=0, and bf16 λ>0."""

    fp32: Verdict
    weight_decay: Verdict


@dataclass(frozen=True)
class Claim2Group:
    """Claim 2 in one group of runs: its cells, each flagged run's evidence, and its verdict."""

    group: str
    cells: list[Cell]
    evidence: list[Evidence]
    verdict: Verdict
    reason: str
    controls: Controls | None = field(metadata=OMIT_IF_NONE)  # None: bf16 λ=0 never blew up


# --- claim 3 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Best:
    """An optimizer's best decayed arm in claim 3: its coefficient, loss and gain on no decay."""

    weight_decay: float
    loss: Stat
    vs_baseline: Comparison
    improvement_percent: float


@dataclass(frozen=True)
class Claim3Group:
    """Claim 3 in one of claim 1's groups: each optimizer's best arm against no decay."""

    group: str
    loss_name: str
    baseline: Stat
    best: dict[str, Best]  # by optimizer ("adamw", "adam_l2"), where one has a final loss
    arms: list[Arm]
    l2_minus_adamw: Comparison | None = field(metadata=OMIT_IF_NONE)  # None: a side lacks a loss
    verdict: Verdict
    reason: str


@dataclass(frozen=True)
class Claim(Generic[G]):
    """Claims 2 and 3 over all groups: the combined verdict, its reason, each group's answer."""

    title: str
    verdict: Verdict
    reason: str
    groups: list[G]


# --- power and LR sensitivity ----------------------------------------------------------------


@dataclass(frozen=True)
class PowerCell:
    """The final validation losses of one cell (runs alike in every varying key but the seed)."""

    cell: str
    final_val_loss: Stat


@dataclass(frozen=True)
class Power:
    """How many seeds a cell needs, from the seed spread pooled over the cells."""

    metric: str
    cells: list[PowerCell]
    pooled_std: float
    dof: int
    effect: float
    seeds_needed: int | None  # None: no cell has two seeds
    detectable: dict[int, float]  # seeds per cell -> smallest difference of means resolved


@dataclass(frozen=True)
class LRSensitivity:
    """One recipe's LR sensitivity over seeds, and each seed's best LR."""

    group: str
    lrs: list[float]
    sensitivity: Stat
    best_lrs: list[float]


# --- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """One directory given to study.report: its runs, their statuses and what varies."""

    name: str
    path: str
    runs: int
    manifest_runs: int | None  # runs listed in sweep.yaml (None: no readable list)
    statuses: str
    varying: list[str]
    compare: str | None  # study.compare's summary.md, relative to the report (None: not made)


@dataclass(frozen=True)
class KernelPath:
    """How many runs share a CPU kernel path and data loss floor."""

    kernel_path: str | None  # None: runs made before the path was recorded
    loss_floor: float
    runs: int


@dataclass(frozen=True)
class Rule:
    """The verdict rule's constants, recorded with the verdicts they produced."""

    z: float
    min_seeds: int
    fisher_p: float
    final_window: float
    mid_window: tuple[float, float]


@dataclass(frozen=True)
class Claims:
    """The three claims' answers."""

    claim1: Claim1
    claim2: Claim[Claim2Group]
    claim3: Claim[Claim3Group]


@dataclass(frozen=True)
class Report:
    """Everything claims.json holds; report.md is drawn from the same object."""

    generated_by: str
    rule: Rule
    runs: int
    sweeps: list[Sweep]
    claims: Claims
    lr_sensitivity: list[LRSensitivity]
    power: Power
    paths: list[KernelPath]
    notes: list[str]


def to_json(value: Any) -> Any:
    """`value` as claims.json holds it: dataclasses as objects keyed by field name, Stats as
    their numbers, tuples as lists, keys as strings, non-finite floats as null (strict JSON).

    Not `dataclasses.asdict`: it would write a Stat as its bare values and keep None fields
    that the file has always left out.
    """
    if isinstance(value, Stat):
        value = value.to_json()
    elif is_dataclass(value) and not isinstance(value, type):
        value = {
            f.name: getattr(value, f.name)
            for f in fields(value)
            if not (f.metadata.get(_OMIT) and getattr(value, f.name) is None)
        }
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
