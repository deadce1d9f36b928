"""The remedy table of `divergence.policy=heal`: which change answers which diagnosis; pure.

A diagnosis (`postmortem.diagnose`) names a mechanism; each mechanism has a ladder of remedies,
mildest first, read top to bottom:

| mechanism | remedies, in order |
|---|---|
| transient | retry the same batches unchanged |
| bad_batch | skip the batch the diagnosis named (`data.skip_batches`) |
| optimizer | an lr cooldown; a higher Adam eps; clipping, where it was off |
| attention | attention-logit soft-capping; an lr cooldown |
| output_logit | z-loss; output-logit soft-capping |
| weight_norm | more weight decay; an lr cooldown |

A remedy is a config change and nothing else: the heal records it in the run's config from
the step it rolls back to, so a resume, a replay and a diagnosis reproduce it. The strengths
are `divergence.heal.*`. A remedy that was applied `heal.tries` times to the same detection
(kind and metric), and the detection came back, gives way to the next one; past the last, and
for a mechanism without a ladder (undetermined), the run stops with the reason.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from configs.schema import TrainConfig

LADDERS: dict[str, tuple[str, ...]] = {
    "transient": ("retry",),
    "bad_batch": ("skip_batch",),
    "optimizer": ("lr_cooldown", "eps", "grad_clip"),
    "attention": ("attn_softcap", "lr_cooldown"),
    "output_logit": ("z_loss", "output_softcap"),
    "weight_norm": ("weight_decay", "lr_cooldown"),
}


@dataclass(frozen=True)
class Remedy:
    """One heal's change: its name, the config keys it sets (dotted key: [old, new]), and a
    sentence saying what it does."""

    name: str
    text: str
    changes: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Situation:
    """What a remedy is chosen from: the run's config in force, the step it rolls back to, the
    batch the diagnosis blamed (data), and the largest attention logit at that step."""

    cfg: TrainConfig
    rollback_step: int
    batch_position: int | None = None
    attn_logit_max: float | None = None


def remedy(name: str, at: Situation) -> Remedy | None:
    """Remedy `name` for the run in `at`; None where it cannot act (already in force)."""
    cfg, h = at.cfg, at.cfg.divergence.heal
    o, m = cfg.optim, cfg.model
    if name == "retry":
        return Remedy(name, "retry the same batches unchanged")
    if name == "skip_batch":
        skip = cfg.data.skip_batches
        if at.batch_position is None or at.batch_position in skip:
            return None
        new = sorted([*skip, at.batch_position])
        return _change(
            name, f"skip global batch {at.batch_position}", "data.skip_batches", skip, new
        )
    if name == "lr_cooldown":
        old = [c.model_dump() for c in o.cooldowns]
        cooldown = {
            "start": at.rollback_step,
            "steps": h.cooldown_steps,
            "factor": h.cooldown_factor,
        }
        text = (
            f"lr x {h.cooldown_factor:g} for steps {at.rollback_step}-"
            f"{at.rollback_step + h.cooldown_steps - 1}, then the schedule"
        )
        return _change(name, text, "optim.cooldowns", old, [*old, cooldown])
    if name == "eps":
        new = h.eps if o.eps < h.eps else 10 * o.eps
        return _change(name, f"Adam eps {o.eps:g} -> {new:g}", "optim.eps", o.eps, new)
    if name == "grad_clip":
        return _switch_on(name, "clip the grad norm", "optim.grad_clip", o.grad_clip, h.grad_clip)
    if name == "attn_softcap":
        cap = softcap_for(at.attn_logit_max, h.attn_softcap, cfg.divergence.attn_logit_max)
        what = "soft-cap the attention logits"
        return _switch_on(name, what, "model.attn_softcap", m.attn_softcap, cap)
    if name == "output_softcap":
        what = "soft-cap the output logits"
        return _switch_on(name, what, "model.output_softcap", m.output_softcap, h.output_softcap)
    if name == "z_loss":
        new = h.z_loss if m.z_loss < h.z_loss else 10 * m.z_loss
        return _change(name, f"z-loss {m.z_loss:g} -> {new:g}", "model.z_loss", m.z_loss, new)
    if name == "weight_decay":
        new = max(h.weight_decay, 2 * o.weight_decay)
        text = f"weight decay {o.weight_decay:g} -> {new:g}"
        return _change(name, text, "optim.weight_decay", o.weight_decay, new)
    raise ValueError(f"unknown remedy {name!r}")


def softcap_for(logit_max: float | None, least: float, threshold: float) -> float:
    """The attention soft cap: twice the largest logit at the step rolled back to, so that it
    barely changes the function there (tanh(x) ~ x well below the cap), at least `least`
    (`heal.attn_softcap`), and below the detector's `threshold` (90% of it), so the capped
    logits cannot be detected again."""
    cap = max(least, 2 * logit_max) if logit_max is not None else least
    return min(cap, 0.9 * threshold)


def _change(name: str, text: str, key: str, old: Any, new: Any) -> Remedy:
    return Remedy(name, text, {key: [old, new]})


def _switch_on(name: str, what: str, key: str, old: float, new: float) -> Remedy | None:
    """Turn on, at `new`, what is off (0); None where it is on already."""
    return None if old > 0 else _change(name, f"{what} at {new:g}", key, old, new)


def choose(
    mechanism: str,
    detection: Mapping[str, Any],
    heals: Sequence[Mapping[str, Any]],
    at: Situation,
) -> Remedy | str:
    """The remedy for `detection` diagnosed as `mechanism`, given the run's earlier `heals`
    (their events); or, when the run must stop, the reason why."""
    h = at.cfg.divergence.heal
    bound = bound_reached(heals, at.cfg)
    if bound is not None:
        return bound
    ladder = LADDERS.get(mechanism)
    if ladder is None:
        return f"the diagnosis named no mechanism with a remedy ({mechanism})"
    same = [e for e in heals if _same_detection(e["detection"], detection)]
    for name in ladder:
        if sum(e["remedy"] == name for e in same) >= h.tries:
            continue
        found = remedy(name, at)
        if found is not None:
            return found
    tried = ", ".join(ladder)
    return (
        f"every remedy for {mechanism} ({tried}) was tried or is in force, and "
        f"{detection['kind']} of {detection['metric']} came back"
    )


def bound_reached(heals: Sequence[Mapping[str, Any]], cfg: TrainConfig) -> str | None:
    """Why no heal may follow the run's `heals` (`divergence.heal.max_heals` made), or None;
    asked before a diagnosis is paid for, and again by `choose`."""
    most = cfg.divergence.heal.max_heals
    return (
        f"divergence.heal.max_heals={most} heals were made already" if len(heals) >= most else None
    )


def _same_detection(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return (a["kind"], a["metric"]) == (b["kind"], b["metric"])
