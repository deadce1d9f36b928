"""The paper's three claims as verdicts on our runs: what each run says, the statistics, the rules.

Runs are grouped by every varying config key except `run.seed` (and keys zipped one-to-one with
the seed or the weight decay, such as `checkpoint.init_from`); a group's number is the mean over
its seeds with the sample std and n. The verdict rules (study.report writes them into report.md):

- An effect counts when the difference of two means exceeds Z = 2 standard errors of that
  difference. With fewer than 2 finite values on either side there is no spread: "cannot tell".
- Enough seeds and no effect beyond the spread (or one in the other direction): "not reproduced".
- Divergence counts are compared with Fisher's exact test, one-sided p <= 0.05 (3 of 3 runs
  against 0 of 3 is the smallest split that passes).
- Groups that disagree give "cannot tell" overall, with each group's verdict listed.
- Claim 2 counts runs that *blew up* (the loss ends non-finite, or never comes back after the
  first detection); runs merely *flagged* by a detector (a recovered spike) are reported per
  detection kind but do not count as divergences. Blown-up runs stay out of loss statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from study.results import (
    CANNOT_TELL,
    NOT_REPRODUCED,
    REPRODUCED,
    Arm,
    Best,
    Cell,
    Claim,
    Claim1,
    Claim1Group,
    Claim2Group,
    Claim3Group,
    Controls,
    Evidence,
    Finding,
    Judged,
    LRSensitivity,
    Power,
    PowerCell,
    Verdict,
)
from study.runs import DETECTION_KINDS, MISSING, Run, canonical, label, to_float, varying_keys
from study.sensitivity import LR_KEY, LRGroup, follows_lr
from study.stats import (
    EFFECT,
    MIN_SEEDS,
    Comparison,
    Stat,
    detectable,
    fisher_greater,
    pooled_std,
    seeds_needed,
    stat,
    versus,
    versus_text,
)

WD, SEED, OPT, PREC = "optim.weight_decay", "run.seed", "optim.name", "precision"
PROTECTED = {WD, SEED, OPT, PREC, LR_KEY}  # never dropped as "follows the weight decay"
DIVERGENCE_KINDS = ("nonfinite", "spike", "drift", "output_logit")  # attn_logit: a precursor
FISHER_P = 0.05
FINAL_WINDOW = 0.05  # final train loss: mean over the last 5% of train.max_steps
MID_WINDOW = (0.35, 0.45)  # the paper's mid-training comparison is at 20k of 50k steps
MID_VAL_REACH = 0.1  # a mid-training evaluation may sit this far (fraction of the run) from 40%
RECOVERY = 0.5  # a run that gives back over half its loss drop by its end did not recover
EVIDENCE_STEPS = 32  # monitor's default evidence window; used when an event carries none
TITLES = {
    "claim1": "Weight decay changes the dynamics through the effective LR and ends at lower loss",
    "claim2": "bf16 without weight decay diverges late; fp32 does not; weight decay prevents it",
    "claim3": "Adam + L2 gives a similar but smaller improvement than AdamW",
}


# --- verdicts --------------------------------------------------------------------------------


def combine(answers: Sequence[Judged]) -> Verdict:
    """All groups that decided agree: that verdict; none decided or they disagree: cannot tell."""
    decided = {a.verdict for a in answers if a.verdict != CANNOT_TELL}
    return decided.pop() if len(decided) == 1 else CANNOT_TELL


def joined_reason(named: Sequence[tuple[str, Judged]], verdict: Verdict, what: str) -> str:
    """One paragraph from (group name, its answer) pairs: a lead-in when the groups disagree,
    then each group's reason."""
    if not named:
        return f"No runs for {what}."
    if len(named) == 1:
        return named[0][1].reason
    answers = [a for _, a in named]
    counts = {v: sum(a.verdict == v for a in answers) for v in (REPRODUCED, NOT_REPRODUCED)}
    lead = (
        f"Groups disagree ({counts[REPRODUCED]} reproduced, {counts[NOT_REPRODUCED]} not)."
        if verdict == CANNOT_TELL and all(counts.values())
        else f"{len(named)} groups."
    )
    return " ".join([lead] + [f"[{name}: {a.verdict}] {a.reason}" for name, a in named])


# --- what each run says ----------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """The numbers the claims need from one run; loss statistics NaN where the run is left out."""

    run: Run
    optimizer: str
    wd: float
    precision: str
    max_steps: float
    final_loss: float
    final_val_loss: float
    val_gap_to_floor: float  # final val loss above the data's loss floor (NaN: no floor known)
    mid_loss: float
    mid_val_loss: float  # the evaluation nearest the middle of MID_WINDOW (NaN: none near it)
    norm_decay: float
    eff_lr_decay: float
    adam_eff_lr: float  # the paper's Adam effective LR, mean lr/(sqrt(v)+eps), 2nd half
    flagged: bool  # status diverged or a divergence detection (the brief's "divergence")
    blew_up: bool  # flagged and never recovered, or a non-finite loss (used by the verdict)
    first_step: int | None
    first_event: dict[str, Any] | None  # an events.jsonl record, free-form like the file
    kinds: dict[str, int]  # detection kind -> detections


def series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """`run.series`, with `eff_lr/decay` as `lr / param_norm/decay` for runs that lack it."""
    if key != "eff_lr/decay" or key in run.metric_keys():
        return run.series(key)
    steps, lrs = run.series("lr")
    norm_steps, norms = run.series("param_norm/decay")
    if not np.array_equal(steps, norm_steps):
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return steps, lrs / norms


def _window_mean(run: Run, key: str, low: float, high: float) -> float:
    steps, values = series(run, key)
    keep = (steps >= low) & (steps <= high) & np.isfinite(values)
    return float(values[keep].mean()) if keep.any() else math.nan


def _blew_up(run: Run, first_step: int | None, width: float) -> bool:
    """A divergence in the paper's sense: the loss ends non-finite, or after the first detection
    it never comes back (its last window gives back over RECOVERY of the drop made before).

    A spike the run recovers from is flagged by the detectors but did not blow up.
    """
    steps, losses = run.series("loss")
    if losses.size and not math.isfinite(losses[-1]):
        return True
    if first_step is None or not steps.size:
        return False
    ok = np.isfinite(losses)
    before = losses[ok & (steps < first_step) & (steps >= first_step - width)]
    before = before if before.size else losses[ok & (steps < first_step)][-1:]
    end = losses[steps >= max(steps[-1] - width, first_step)]
    if not before.size or not end.size:
        return bool(end.size and not np.isfinite(end).all())
    level = float(before.mean())
    return not np.isfinite(end).all() or end.mean() > level + RECOVERY * (run.initial_loss - level)


def _mid_val(run: Run, max_steps: float) -> float:
    """The validation loss evaluated nearest the middle of MID_WINDOW, if within
    MID_VAL_REACH of it (evaluations are sparse: 3 in a run that evaluates every 400 steps)."""
    middle = sum(MID_WINDOW) / 2 * max_steps
    near = [s for s in run.val if abs(s - middle) <= MID_VAL_REACH * max_steps]
    return run.val[min(near, key=lambda s: abs(s - middle))] if near else math.nan


def facts(run: Run) -> Facts:
    """Read the claim numbers off one run (see the module docstring for the windows)."""
    cfg, summary = run.flat_config, run.summary
    steps, losses = run.series("loss")
    max_steps = to_float(cfg.get("train.max_steps"))
    if not math.isfinite(max_steps):
        max_steps = float(steps.max()) if steps.size else math.nan
    final = _window_mean(run, "loss", (1 - FINAL_WINDOW) * max_steps, math.inf)
    finite = losses[np.isfinite(losses)]
    if not math.isfinite(final) and summary.get("status") == "completed" and finite.size:
        final = float(finite[-1])  # logged too rarely for the window: the last line
    _, norms = run.series("param_norm/decay")
    norms = norms[np.isfinite(norms)]
    status_diverged = summary.get("status") == "diverged"
    kinds = {k: sum(e["kind"] == k for e in run.detections) for k in DETECTION_KINDS}
    # a record-only detection (a grad-norm spike the loss did not follow) flags nothing
    events = sorted(
        (e for e in run.detections if e["kind"] in DIVERGENCE_KINDS and e.get("actionable", True)),
        key=lambda e: e["step"],
    )
    first_event = events[0] if events else None
    first_step = first_event["step"] if first_event else None
    if status_diverged and first_event is None:
        first_step = summary.get("first_divergence_step") or summary.get("steps")
        first_event = next(iter(sorted(run.detections, key=lambda e: e["step"])), None)
    blew_up = status_diverged or kinds["nonfinite"] > 0
    blew_up = blew_up or _blew_up(run, first_step, FINAL_WINDOW * max_steps)
    if blew_up and first_step is None and (~np.isfinite(losses)).any():
        first_step = int(steps[~np.isfinite(losses)][0])  # no detector: the first bad loss
    left_out = math.nan if blew_up else 1.0  # blown-up runs stay out of loss statistics
    return Facts(
        run=run,
        optimizer=str(cfg.get(OPT, "adamw")),
        wd=to_float(cfg.get(WD)),
        precision=str(cfg.get(PREC, "?")),
        max_steps=max_steps,
        final_loss=final * left_out,
        final_val_loss=to_float(summary.get("final_val_loss")) * left_out,
        val_gap_to_floor=(to_float(summary.get("final_val_loss")) - run.loss_floor) * left_out,
        mid_loss=_window_mean(run, "loss", *(f * max_steps for f in MID_WINDOW)) * left_out,
        mid_val_loss=_mid_val(run, max_steps) * left_out,
        norm_decay=(float(norms[-1]) if norms.size else math.nan) * left_out,
        eff_lr_decay=_window_mean(run, "eff_lr/decay", max_steps / 2, math.inf) * left_out,
        adam_eff_lr=_window_mean(run, "adam_eff_lr", max_steps / 2, math.inf) * left_out,
        flagged=status_diverged or bool(events),
        blew_up=blew_up,
        first_step=first_step,
        first_event=first_event,
        kinds=kinds,
    )


def _determine(runs: Sequence[Run], key: str, other: str) -> bool:
    """Whether two keys determine each other across the runs (zipped one-to-one in a sweep)."""
    pairs = {
        (canonical(r.flat_config.get(key, MISSING)), canonical(r.flat_config.get(other, MISSING)))
        for r in runs
    }
    return len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def contexts(items: Sequence[Facts], drop: Sequence[str]) -> list[tuple[str, list[Facts]]]:
    """Runs grouped by every varying key except the seed, `drop` and their one-to-one partners,
    and the precision's and optimizer's (`bf16_kernels=emulated` on every bf16 run is part of the
    bf16 arm, `optim.l2_form=loss` on every Adam+L2 run part of that arm)."""
    runs = [f.run for f in items]
    keys = [k for k in varying_keys(runs) if k not in drop and k != SEED]
    keys = [
        k
        for k in keys
        if k in PROTECTED or not any(_determine(runs, k, o) for o in (WD, SEED, PREC, OPT))
    ]
    groups: dict[str, tuple[str, list[Facts]]] = {}
    for f in items:
        group_id = " ".join(canonical(f.run.flat_config.get(k, MISSING)) for k in keys)
        groups.setdefault(group_id, (label(f.run, keys) if keys else "all runs", []))[1].append(f)
    return list(groups.values())


def arms(items: Sequence[Facts]) -> dict[tuple[str, float], list[Facts]]:
    """Runs by (optimizer, weight decay), sorted."""
    by_arm: dict[tuple[str, float], list[Facts]] = {}
    for f in items:
        by_arm.setdefault((f.optimizer, f.wd), []).append(f)
    return dict(sorted(by_arm.items(), key=lambda item: (item[0][0] != "adamw", item[0])))


def baseline(by_arm: dict[tuple[str, float], list[Facts]]) -> list[Facts]:
    """The no-decay runs (AdamW λ=0; Adam+L2 at 0 is the same algorithm)."""
    return by_arm.get(("adamw", 0.0)) or by_arm.get(("adam_l2", 0.0)) or []


def arm_name(optimizer: str, wd: float) -> str:
    return f"λ={wd:g}" if optimizer == "adamw" else f"L2={wd:g}"


# --- claim 1 ---------------------------------------------------------------------------------


def _arm(optimizer: str, wd: float, items: list[Facts], base: Stat, on_val: bool) -> Arm:
    final, val = stat([f.final_loss for f in items]), stat([f.final_val_loss for f in items])
    loss = val if on_val else final  # what the verdict compares (`verdict_loss`)
    return Arm(
        optimizer=optimizer,
        weight_decay=wd,
        runs=len(items),
        left_out=len(items) - final.n,
        final_loss=final,
        final_val_loss=val,
        loss=loss,
        val_gap_to_floor=stat([f.val_gap_to_floor for f in items]),
        mid_loss=stat([f.mid_loss for f in items]),
        mid_val_loss=stat([f.mid_val_loss for f in items]),
        param_norm_decay=stat([f.norm_decay for f in items]),
        eff_lr_decay=stat([f.eff_lr_decay for f in items]),
        adam_eff_lr=stat([f.adam_eff_lr for f in items]),
        final_vs_baseline=versus(loss, base),
    )


def verdict_loss(items: Sequence[Facts]) -> bool:
    """Whether the verdict compares final validation losses rather than final train losses.

    Validation when every run that did not blow up has one: in one pass over fresh data both
    estimate the same expected loss, and every run is scored on the same fixed set, where each
    run's last training batches are its own (its seed orders the data), so a difference between
    runs is the models' alone.
    """
    kept = [f for f in items if not f.blew_up]
    return bool(kept) and all(math.isfinite(f.final_val_loss) for f in kept)


def _claim1_group(name: str, items: list[Facts]) -> Claim1Group:
    by_arm = arms(items)
    base_runs = baseline(by_arm)
    on_val = verdict_loss(items)
    what = "final validation loss" if on_val else "final train loss"
    base = _arm("adamw", 0.0, base_runs, Stat([]), on_val)
    rows = [_arm(o, wd, fs, base.loss, on_val) for (o, wd), fs in by_arm.items()]
    decayed = [r for r in rows if r.optimizer == "adamw" and r.weight_decay > 0]
    known = [r for r in decayed if r.final_vs_baseline.sign != "unknown"]
    text = "; ".join(
        f"λ={r.weight_decay:g}: {r.loss.text()}, {versus_text(r.final_vs_baseline)}"
        for r in decayed
    )
    verdict: Verdict
    if not base_runs or not decayed:
        verdict, reason = CANNOT_TELL, "needs AdamW runs at λ=0 and at some λ>0 in one setting."
    elif not base.loss.n:
        verdict = CANNOT_TELL
        reason = f"all {len(base_runs)} λ=0 runs blew up: no final loss to compare against."
    elif base.loss.n < MIN_SEEDS or not known:
        verdict = CANNOT_TELL
        reason = f"too few seeds to see the spread (λ=0: {base.loss.text()}; {text})."
    else:
        lower = [r for r in known if r.final_vs_baseline.sign == "lower"]
        verdict = REPRODUCED if lower else NOT_REPRODUCED
        ends = "ends lower than" if lower else "does not end below"
        reason = (
            f"{what} at λ=0 is {base.loss.text()}; {text}. Weight decay "
            f"{ends} no decay beyond 2 SE of the seed spread."
        )
    return Claim1Group(
        group=name,
        verdict=verdict,
        reason=reason,
        arms=rows,
        baseline=base.loss,
        loss_name=what,
        mechanism=_mechanism(base, known),
        order=_order(base, known, on_val),
    )


def _mechanism(base: Arm, known: list[Arm]) -> Finding:
    """Decay-group norm lower and effective LR higher with weight decay, beyond 2 SE."""
    parts, shown = [], 0
    for r in known:
        norm = versus(r.param_norm_decay, base.param_norm_decay)
        eff = versus(r.eff_lr_decay, base.eff_lr_decay)
        shown += norm.sign == "lower" and eff.sign == "higher"
        parts.append(
            f"λ={r.weight_decay:g}: norm {versus_text(norm, '.4g')}, "
            f"effective LR {versus_text(eff, '.3g')}"
        )
    if not parts or base.param_norm_decay.n < MIN_SEEDS or base.eff_lr_decay.n < MIN_SEEDS:
        return Finding(CANNOT_TELL, "no decay-group norm / effective LR to compare.")
    return Finding(REPRODUCED if shown else NOT_REPRODUCED, "vs λ=0, " + "; ".join(parts) + ".")


def _order(base: Arm, known: list[Arm], on_val: bool) -> Finding:
    """The paper's crossover: the largest λ is above λ=0 mid-training and below it at the end.

    On validation losses where every run has a mid-training evaluation and the verdict reads
    validation losses; on the train-loss windows otherwise.
    """
    if not known:
        return Finding(CANNOT_TELL, "too few seeds or no λ>0.")
    top = known[-1]
    mid_val = on_val and all(r.mid_val_loss.n == r.loss.n for r in (base, top))
    mid = (
        versus(top.mid_val_loss, base.mid_val_loss)
        if mid_val
        else versus(top.mid_loss, base.mid_loss)
    )
    end = versus(top.loss, base.loss)
    verdict: Verdict
    if "unknown" in (mid.sign, end.sign):
        verdict = CANNOT_TELL
    else:
        verdict = REPRODUCED if (mid.sign, end.sign) == ("higher", "lower") else NOT_REPRODUCED
    reason = (
        f"λ={top.weight_decay:g} minus λ=0 ({'validation' if mid_val else 'train'} losses): "
        f"mid-training {versus_text(mid)}, final {versus_text(end)}."
    )
    return Finding(verdict, reason)


def _combined(named: Sequence[tuple[str, Judged]], what: str) -> Finding:
    """The groups' answers as one: `combine`'s verdict with `joined_reason`'s paragraph."""
    verdict = combine([a for _, a in named])
    return Finding(verdict, joined_reason(named, verdict, what))


def claim1(items: Sequence[Facts]) -> Claim1:
    groups = [_claim1_group(name, fs) for name, fs in contexts(items, (WD, OPT))]
    overall = _combined([(g.group, g) for g in groups], "claim 1")
    return Claim1(
        title=TITLES["claim1"],
        groups=groups,
        verdict=overall.verdict,
        reason=overall.reason,
        mechanism=_combined([(g.group, g.mechanism) for g in groups], "mechanism"),
        order=_combined([(g.group, g.order) for g in groups], "order"),
    )


# --- claim 2 ---------------------------------------------------------------------------------


def evidence(f: Facts) -> Evidence:
    """Max attention logit and log Z in the window before the first divergence."""
    event, step = f.first_event, f.first_step
    records = list((event or {}).get("evidence") or [])
    source = "event evidence"
    if not any("attn_logit_max" in r or "log_z" in r for r in records) and step is not None:
        records = [{"step": s, **f.run.metrics[s]} for s in sorted(f.run.metrics)]
        records = [r for r in records if step - EVIDENCE_STEPS < r["step"] <= step]
        source = "metrics.jsonl"
    attn = [(to_float(r.get("attn_logit_max")), r) for r in records]
    attn = [(v, r) for v, r in attn if math.isfinite(v)]
    log_z = [to_float(r.get("log_z")) for r in records]
    log_z = [v for v in log_z if math.isfinite(v)]
    top, layer = (max(attn, key=lambda p: p[0]) if attn else (math.nan, {})), None
    per_layer = [to_float(v) for v in top[1].get("attn_logit_max/layers") or []]
    if per_layer and any(math.isfinite(v) for v in per_layer):
        layer = int(np.nanargmax(per_layer))
    return Evidence(
        run=f.run.name,
        path=str(f.run.path),
        blew_up=f.blew_up,
        kind=(event or {}).get("kind", "status diverged"),
        metric=(event or {}).get("metric"),
        value=(event or {}).get("value"),
        step=step,
        source=source,
        window=(records[0].get("step"), records[-1].get("step")) if records else None,
        attn_logit_max=top[0],
        attn_logit_max_step=top[1].get("step"),
        attn_logit_max_layer=layer,
        log_z_last=log_z[-1] if log_z else math.nan,
        log_z_max_abs=max(map(abs, log_z)) if log_z else math.nan,
    )


def _cell(precision: str, wd: float, items: list[Facts]) -> Cell:
    flagged = [(f.first_step, f.max_steps) for f in items if f.flagged and f.first_step is not None]
    return Cell(
        precision=precision,
        weight_decay=wd,
        runs=len(items),
        flagged=sum(f.flagged for f in items),
        blew_up=sum(f.blew_up for f in items),
        status_diverged=sum(f.run.summary.get("status") == "diverged" for f in items),
        runs_with={k: sum(f.kinds[k] > 0 for f in items) for k in DETECTION_KINDS},
        events={k: sum(f.kinds[k] for f in items) for k in DETECTION_KINDS},
        first_divergence_steps=[step for step, _ in flagged],
        blew_up_steps=[f.first_step for f in items if f.blew_up and f.first_step is not None],
        first_divergence_step=stat([step for step, _ in flagged]),
        first_divergence_fraction=stat([step / max_steps for step, max_steps in flagged]),
        max_steps=max((f.max_steps for f in items), default=math.nan),
    )


def _control(a: Cell, c: Cell | None, what: str) -> tuple[Verdict, str]:
    """bf16 λ=0 against one control: fewer blow-ups there, by Fisher's exact test."""
    if c is None or not c.runs:
        return CANNOT_TELL, f"{what} was not run"
    p = fisher_greater(a.blew_up, a.runs, c.blew_up, c.runs)
    counts = f"{what} {c.blew_up}/{c.runs} (one-sided Fisher p={p:.3g})"
    if p <= FISHER_P:
        return REPRODUCED, counts
    if c.blew_up / c.runs >= a.blew_up / a.runs:
        return NOT_REPRODUCED, counts + ", as often as bf16 λ=0"
    return CANNOT_TELL, counts + ", fewer but too few runs to tell"


def _claim2_group(name: str, items: list[Facts]) -> Claim2Group:
    cells_by: dict[tuple[str, float], list[Facts]] = {}
    for f in sorted(items, key=lambda f: (f.precision, f.wd)):
        cells_by.setdefault((f.precision, f.wd), []).append(f)
    cells = [_cell(p, wd, fs) for (p, wd), fs in cells_by.items()]
    wd_runs = [f for (p, wd), fs in cells_by.items() if p == "bf16" and wd > 0 for f in fs]
    a = cells_by.get(("bf16", 0.0))
    evidences = [evidence(f) for f in items if f.flagged or f.blew_up]
    if not a:
        reason = "bf16 without weight decay was not run."
        return Claim2Group(name, cells, evidences, CANNOT_TELL, reason, controls=None)
    a_cell = _cell("bf16", 0.0, a)
    when = ", ".join(str(s) for s in a_cell.blew_up_steps)
    head = f"bf16 λ=0 blew up in {a_cell.blew_up}/{a_cell.runs} runs" + (
        f" (from steps {when} of {a_cell.max_steps:g})"
        if when
        else f" within {a_cell.max_steps:g} steps"
    )
    head += f", detectors flagged {a_cell.flagged}/{a_cell.runs}"
    if not a_cell.blew_up:
        others = sum(c.blew_up for c in cells)
        reason = (
            f"{head}; {others} runs of the other cells blew up. There is nothing for "
            "fp32 or weight decay to prevent here (the paper's divergences came late in runs "
            "of tens of thousands of steps)."
        )
        return Claim2Group(name, cells, evidences, NOT_REPRODUCED, reason, controls=None)
    fp32 = cells_by.get(("fp32", 0.0))
    parts = [
        _control(a_cell, _cell("fp32", 0.0, fp32) if fp32 else None, "fp32 λ=0"),
        _control(a_cell, _cell("bf16", -1.0, wd_runs) if wd_runs else None, "bf16 λ>0"),
    ]
    verdicts = {v for v, _ in parts}
    verdict = (
        NOT_REPRODUCED
        if NOT_REPRODUCED in verdicts
        else REPRODUCED
        if verdicts == {REPRODUCED}
        else CANNOT_TELL
    )
    reason = f"{head}; against it {'; '.join(t for _, t in parts)}."
    controls = Controls(fp32=parts[0][0], weight_decay=parts[1][0])
    return Claim2Group(name, cells, evidences, verdict, reason, controls)


def claim2(items: Sequence[Facts]) -> Claim[Claim2Group]:
    adamw = [f for f in items if f.optimizer == "adamw"]  # the claim is about AdamW's λ
    groups = [_claim2_group(name, fs) for name, fs in contexts(adamw, (WD, PREC))]
    overall = _combined([(g.group, g) for g in groups], "claim 2")
    return Claim(TITLES["claim2"], overall.verdict, overall.reason, groups)


# --- claim 3 ---------------------------------------------------------------------------------


def _best(c1_group: Claim1Group, optimizer: str) -> Best | None:
    """The optimizer's decayed arm with the lowest mean verdict loss (None: none has one)."""
    rows = [
        r for r in c1_group.arms if r.optimizer == optimizer and r.weight_decay > 0 and r.loss.n
    ]
    if not rows:
        return None
    row = min(rows, key=lambda r: r.loss.mean)
    gain = row.final_vs_baseline
    percent = -100 * gain.diff / c1_group.baseline.mean
    return Best(row.weight_decay, row.loss, gain, percent)


def _claim3_group(c1_group: Claim1Group) -> Claim3Group:
    """Best arm of each optimizer against the no-decay baseline, from claim 1's table."""
    base = c1_group.baseline
    w, l2 = _best(c1_group, "adamw"), _best(c1_group, "adam_l2")
    best = {o: b for o, b in (("adamw", w), ("adam_l2", l2)) if b is not None}
    gap = None
    if base.n and w is not None and l2 is not None:
        gap = versus(l2.loss, w.loss)
        verdict, reason = _claim3_verdict(base, w, l2, gap)
    else:
        need = {"no decay (λ=0)": base.n > 0, "AdamW λ>0": w is not None, "Adam+L2": l2 is not None}
        missing = ", ".join(name for name, present in need.items() if not present)
        verdict = CANNOT_TELL
        reason = f"no final loss (not run, or every run blew up) for {missing}."
    return Claim3Group(
        group=c1_group.group,
        loss_name=c1_group.loss_name,
        baseline=base,
        best=best,
        arms=c1_group.arms,
        l2_minus_adamw=gap,
        verdict=verdict,
        reason=reason,
    )


def _claim3_verdict(base: Stat, w: Best, l2: Best, gap: Comparison) -> tuple[Verdict, str]:
    """Adam+L2 below no decay and above AdamW, each beyond 2 SE: the verdict and its reason."""
    reason = (
        f"no decay {base.text()}; best AdamW λ={w.weight_decay:g} "
        f"{versus_text(w.vs_baseline)}; best Adam+L2 (L2={l2.weight_decay:g}) "
        f"{versus_text(l2.vs_baseline)}; Adam+L2 minus AdamW {versus_text(gap)}."
    )
    signs = (l2.vs_baseline.sign, gap.sign)
    if "unknown" in signs or base.n < MIN_SEEDS:
        return CANNOT_TELL, reason + " Too few seeds to see the spread."
    if signs == ("lower", "higher"):
        return REPRODUCED, reason + " Adam+L2 improves on no decay, and by less than AdamW."
    if signs[0] != "lower":
        return NOT_REPRODUCED, reason + " Adam+L2 does not improve on no decay beyond 2 SE."
    return (
        NOT_REPRODUCED,
        reason + " Adam+L2's improvement is not smaller than AdamW's beyond 2 SE.",
    )


def claim3(c1: Claim1) -> Claim[Claim3Group]:
    """Claim 3 in claim 1's groups (the same runs, grouped by all but λ, optimizer and seed)."""
    groups = [_claim3_group(g) for g in c1.groups]
    overall = _combined([(g.group, g) for g in groups], "claim 3")
    return Claim(TITLES["claim3"], overall.verdict, overall.reason, groups)


# --- power -----------------------------------------------------------------------------------


def power(items: Sequence[Facts]) -> Power:
    """How many seeds a cell needs: the seed spread of the final validation loss within cells
    (runs alike in every varying key but the seed), pooled, and what it resolves."""
    cells = [(name, stat([f.final_val_loss for f in fs])) for name, fs in contexts(items, ())]
    std, dof = pooled_std([s for _, s in cells])
    counts = sorted({s.n for _, s in cells if s.n >= MIN_SEEDS})
    return Power(
        metric="final_val_loss",
        cells=[PowerCell(name, s) for name, s in cells],
        pooled_std=std,
        dof=dof,
        effect=EFFECT,
        seeds_needed=seeds_needed(std) if dof else None,
        detectable={n: detectable(std, n) for n in counts} if dof else {},
    )


# --- LR sensitivity --------------------------------------------------------------------------


def lr_sensitivity(items: Sequence[Facts]) -> list[LRSensitivity]:
    """Wortsman et al.'s LR sensitivity per recipe and seed, then mean ± std over seeds."""
    runs = [f.run for f in items]
    keys = varying_keys(runs)
    if LR_KEY not in keys:
        return []
    keys = [
        k
        for k in keys
        if k not in (LR_KEY, SEED) and not follows_lr(runs, k) and not _determine(runs, k, SEED)
    ]
    grids: dict[str, dict[str, LRGroup]] = {}
    for run in runs:
        lr, initial = to_float(run.flat_config.get(LR_KEY)), run.initial_loss
        if not (math.isfinite(lr) and math.isfinite(initial)):
            continue
        final = to_float(run.summary.get("final_loss"))
        final = math.nan if run.summary.get("status") == "diverged" else final
        name = label(run, keys) if keys else "all runs"
        seed = canonical(run.flat_config.get(SEED, MISSING))
        group = grids.setdefault(name, {}).setdefault(seed, LRGroup(name, [], [], [], []))
        for column, value in zip(
            (group.run_names, group.lrs, group.final_losses, group.initial_losses),
            (run.name, lr, final, initial),
            strict=True,
        ):
            column.append(value)
    rows = []
    for name, by_seed in grids.items():
        seeds = [g for g in by_seed.values() if len(set(g.lrs)) > 1]
        if seeds:
            rows.append(
                LRSensitivity(
                    group=name,
                    lrs=sorted({lr for g in seeds for lr in g.lrs}),
                    sensitivity=stat([g.sensitivity for g in seeds]),
                    best_lrs=[g.best[0] for g in seeds],
                )
            )
    return rows
