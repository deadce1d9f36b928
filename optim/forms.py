"""Adam with per-tensor decay rules (AdamP, Selective Projection Decay), right on every ZeRO stage.

Why layouts: ZeRO 1-2 hand the optimizer one flat fp32 partition per group and rank, ZeRO 3 one
per sub-group; tensor boundaries fall anywhere in it and a tensor may span ranks. A per-tensor or
per-row rule applied to such a flat tensor silently becomes another rule (PyPI AdamP given flat
shards never projects and is plain AdamW). So each flat tensor the optimizer steps comes with a
`Layout`: the full shapes of the tensors it holds pieces of and where those pieces are. Per-row
partial sums over the local pieces go into one small buffer, one all-reduce completes it, and the
update is then local. On ZeRO 0 every tensor is whole and nothing is reduced.
"""

import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# The forms this optimizer implements; the rest are torch's or DeepSpeed's own Adam.
FORMS = ("adamp", "adam_spd")


@dataclass(frozen=True)
class Fragment:
    """A contiguous piece of one tensor (flattened) held in a flat tensor."""

    tensor: int  # index into Layout.shapes
    flat_start: int  # offset in the flat tensor the optimizer sees
    start: int  # offset in the flattened full tensor
    length: int


@dataclass(frozen=True)
class Layout:
    """What a flat tensor holds: every tensor of its group (the same list on every rank, so the
    reduced buffer has one shape everywhere) and this rank's fragments of them."""

    shapes: tuple[torch.Size, ...]
    fragments: tuple[Fragment, ...]
    group: Any = None  # process group whose ranks hold the other fragments; None: all local

    @staticmethod
    def whole(tensor: torch.Tensor) -> "Layout":
        return Layout((tensor.shape,), (Fragment(0, 0, 0, tensor.numel()),))

    def row_sums(self, rows: list[int], values: list[torch.Tensor]) -> torch.Tensor:
        """[sum(rows), len(values)]: each flat tensor in `values` summed over each row of each
        tensor (tensor i has `rows[i]` equal rows; 0 leaves it out), completed across ranks."""
        offsets = [0, *itertools.accumulate(rows)]
        device = values[0].device
        buffer = torch.zeros(offsets[-1], len(values), dtype=torch.float32, device=device)
        stacked = torch.stack([v.reshape(-1) for v in values], dim=1)
        for frag in self.fragments:
            if rows[frag.tensor] == 0:
                continue
            ids = self._row_ids(frag, rows[frag.tensor]) + offsets[frag.tensor]
            piece = stacked[frag.flat_start : frag.flat_start + frag.length]
            buffer.index_add_(0, ids.to(device), piece)
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(buffer, group=self.group)
        return buffer

    def expand(self, frag: Fragment, rows: int, per_row: torch.Tensor) -> torch.Tensor:
        """Per-row values of one tensor, repeated over the elements of fragment `frag`."""
        return per_row[self._row_ids(frag, rows).to(per_row.device)]

    def _row_ids(self, frag: Fragment, rows: int) -> torch.Tensor:
        width = math.prod(self.shapes[frag.tensor]) // rows
        return torch.arange(frag.start, frag.start + frag.length) // width


class FormAdam(torch.optim.Optimizer):
    """Adam whose update or decay depends on per-tensor and per-row quantities.

    `adamp` (Heo et al. 2021): for tensors with ndim > 1, if |cos(g, w)| of every output row is
    below delta/sqrt(row width) the update loses its component along each row of w; failing that,
    if the whole tensor's |cos| is below delta/sqrt(numel), along w as a whole; a projected
    tensor's decay (lr-coupled, torch form) is scaled by `wd_ratio`. Matches PyPI `adamp` 0.3.0.
    `adam_spd` (Tian et al. 2024): the plain Adam step theta~, then, for decayed tensors whose
    gradient already points back toward the starting weights theta_0 (c = -g.(theta - theta_0)
    < 0), theta~ - lambda r (theta~ - theta_0), r = clip((|theta~ - theta_0| - |theta -
    theta_0|) / |theta~ - theta_0|, 0, 1); lambda is the group's weight decay, not scaled by lr.
    theta_0 is each flat tensor's `anchor` state, set by `set_anchor`, so it is sharded like
    the fp32 partition and saved with the optimizer state.
    """

    def __init__(self, params, form: str, lr, betas, eps, weight_decay, delta=0.1, wd_ratio=0.1):
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r}; one of {FORMS}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio
        )
        super().__init__(params, defaults)
        self.form = form
        # id(flat tensor) -> Layout on ZeRO 1-3 (see `attach`); None: every tensor is whole
        self.layouts: dict[int, Layout] | None = None
        self.flats: list[tuple[int, torch.Tensor]] | None = None  # (group index, flat tensor)
        self.counts: Counter = Counter()

    def attach(self, engine, zero_stage: int) -> None:
        """Learn where each tensor lies in the flat fp32 partitions of ZeRO 1-3."""
        if zero_stage == 0:
            return
        zero = engine.optimizer
        self.layouts, self.flats = {}, []
        if zero_stage in (1, 2):
            for i, flat in enumerate(zero.single_partition_of_fp32_groups):
                self.layouts[id(flat)] = _zero12_layout(zero, i)
                self.flats.append((i, flat))
        else:
            for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
                self.layouts[id(flat)] = _zero3_layout(zero, i)
                self.flats.append((zero.sub_group_to_group_id[i], flat))

    def _layout(self, tensor: torch.Tensor) -> Layout:
        if self.layouts is None:
            return Layout.whole(tensor)
        if id(tensor) not in self.layouts:
            raise RuntimeError("FormAdam was handed a flat tensor it has no layout for")
        return self.layouts[id(tensor)]

    def _tensors(self) -> list[tuple[dict, torch.Tensor]]:
        """Every tensor this optimizer updates, with its group, whatever the ZeRO stage."""
        if self.flats is None:
            return [(g, p) for g in self.param_groups for p in g["params"]]
        return [(self.param_groups[i], flat) for i, flat in self.flats]

    @torch.no_grad()
    def set_anchor(self) -> None:
        """theta_0 := the current weights, for every decayed tensor (adam_spd)."""
        for group, tensor in self._tensors():
            if group["weight_decay"] > 0:
                self.state[tensor]["anchor"] = tensor.detach().clone()

    def read_counts(self) -> dict[str, float]:
        """How often the rule fired since the last read, as fractions of the tensors it could
        apply to (identical on every rank: decided from reduced sums)."""
        c, self.counts = self.counts, Counter()
        if self.form == "adamp":
            n = max(c["matrices"], 1)
            return {"adamp_proj_row": c["row"] / n, "adamp_proj_tensor": c["tensor"] / n}
        return {"spd_decay_frac": c["decayed"] / max(c["candidates"], 1)}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim signature
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                direction, step_size = self._adam(p, group)
                if self.form == "adamp":
                    self._adamp(p, group, direction, step_size)
                else:
                    self._spd(p, group, direction, step_size)
        return None

    def _adam(self, p: torch.Tensor, group: dict) -> tuple[torch.Tensor, float]:
        """Update the moments; return the direction m / (sqrt(v_hat) + eps) and its step size
        lr / (1 - beta1^t), in the order of operations of torch's Adam and PyPI adamp."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()
        grad = p.grad
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        return state["exp_avg"] / denom, group["lr"] / (1 - beta1**step)

    def _adamp(self, p: torch.Tensor, group: dict, u: torch.Tensor, step_size: float) -> None:
        layout = self._layout(p)
        rows = [s[0] if len(s) > 1 else 0 for s in layout.shapes]
        p, u, g, eps = p.view(-1), u.view(-1), p.grad.view(-1), group["eps"]
        sums = layout.row_sums(rows, [g * p, g * g, p * p, p * u])
        gw, gg, ww, wu = sums.unbind(1)
        offsets = [0, *itertools.accumulate(rows)]
        coef = torch.zeros_like(gw)  # per row: the projection's multiplier of w
        ratio = [1.0] * len(rows)
        cos_rows = gw.abs() / (gg.sqrt().clamp_min(eps) * ww.sqrt().clamp_min(eps))
        matrices = [i for i in range(len(rows)) if rows[i]]
        spans = [slice(offsets[i], offsets[i + 1]) for i in matrices]
        whole_cos = [
            gw[r].sum().abs()
            / (gg[r].sum().sqrt().clamp_min(eps) * ww[r].sum().sqrt().clamp_min(eps))
            for r in spans
        ]
        # The decisions of all matrices in one read rather than one or two per matrix.
        cosines = (
            torch.stack([cos_rows[r].max() for r in spans] + whole_cos).tolist() if spans else []
        )
        for k, (i, r) in enumerate(zip(matrices, spans, strict=True)):
            self.counts["matrices"] += 1
            numel = math.prod(layout.shapes[i])
            if cosines[k] < group["delta"] / math.sqrt(numel // rows[i]):
                coef[r] = wu[r] / (ww[r].sqrt() + eps) ** 2
                self.counts["row"] += 1
            elif cosines[len(spans) + k] < group["delta"] / math.sqrt(numel):
                coef[r] = wu[r].sum() / (ww[r].sum().sqrt() + eps) ** 2
                self.counts["tensor"] += 1
            else:
                continue
            ratio[i] = group["wd_ratio"]
        for frag in layout.fragments:
            piece = slice(frag.flat_start, frag.flat_start + frag.length)
            w, d = p[piece], u[piece]
            if rows[frag.tensor]:
                d.sub_(w * layout.expand(frag, rows[frag.tensor], coef[offsets[frag.tensor] :]))
            if group["weight_decay"] > 0:
                w.mul_(1 - group["lr"] * group["weight_decay"] * ratio[frag.tensor])
            w.add_(d, alpha=-step_size)

    def _spd(self, p: torch.Tensor, group: dict, u: torch.Tensor, step_size: float) -> None:
        lam = group["weight_decay"]
        if lam == 0:
            p.add_(u, alpha=-step_size)
            return
        anchor = self.state[p].get("anchor")
        if anchor is None:
            raise RuntimeError(
                "adam_spd has no starting weights (theta_0) in its optimizer state: the run must "
                "start from checkpoint.init_from, and resume from its own checkpoints on the same "
                "world size"
            )
        layout = self._layout(p)
        rows = [1] * len(layout.shapes)
        p, u, grad, anchor = p.view(-1), u.view(-1), p.grad.view(-1), anchor.view(-1)
        before = p - anchor
        p.add_(u, alpha=-step_size)  # theta~
        after = p - anchor
        sums = layout.row_sums(rows, [-grad * before, after * after, before * before])
        pull, after_sq, before_sq = sums.unbind(1)
        after_norm = after_sq.sqrt()
        ratio = ((after_norm - before_sq.sqrt()) / after_norm.clamp_min(1e-30)).clamp(0.0, 1.0)
        ratio = torch.where(pull < 0, ratio, torch.zeros_like(ratio))
        # Every tensor's ratio and sign of pull in one read rather than one per fragment.
        ratios, pulled = torch.stack([ratio, (pull < 0).to(ratio.dtype)]).tolist()
        self.counts["candidates"] += len(rows)
        self.counts["decayed"] += int(sum(pulled))
        for frag in layout.fragments:
            piece = slice(frag.flat_start, frag.flat_start + frag.length)
            p[piece].sub_(after[piece], alpha=lam * ratios[frag.tensor])


def _zero12_layout(zero, i: int) -> Layout:
    """ZeRO 1-2: the group's tensors lie end to end (each followed by its alignment padding) in
    one flat buffer, cut into equal partitions, partition r on rank r."""
    group = zero.real_dp_process_group[i]
    size = int(zero.partition_size[i])
    lo = dist.get_rank(group=group) * size
    hi = lo + size
    tensors = zero.round_robin_bit16_groups[i]
    paddings = zero.round_robin_bit16_padding[i] or [0] * len(tensors)
    fragments, position = [], 0
    for j, (tensor, padding) in enumerate(zip(tensors, paddings, strict=True)):
        a, b = max(position, lo), min(position + tensor.numel(), hi)
        if a < b:
            fragments.append(Fragment(j, a - lo, a - position, b - a))
        position += tensor.numel() + padding
    return Layout(tuple(t.shape for t in tensors), tuple(fragments), group)


def _zero3_layout(zero, i: int) -> Layout:
    """ZeRO 3: every tensor is cut into equal partitions of its own (the last padded), and a
    sub-group's flat buffer holds this rank's partitions end to end."""
    group = zero.sub_group_process_groups[i]
    rank = dist.get_rank(group=group)
    fragments, position = [], 0
    params = zero.fp16_groups[i]
    for j, param in enumerate(params):
        size = param.partition_numel()
        start = rank * size
        length = max(0, min(size, param.ds_numel - start))
        if length:
            fragments.append(Fragment(j, position, start, length))
        position += size
    return Layout(tuple(p.ds_shape for p in params), tuple(fragments), group)


def mark_start(optimizer) -> None:
    """The run starts from these weights: adam_spd's theta_0 (nothing for the other forms)."""
    if isinstance(optimizer, FormAdam) and optimizer.form == "adam_spd":
        optimizer.set_anchor()


def form_metrics(optimizer) -> dict[str, float]:
    """The decay rule's firing fractions since the last call; {} for optimizers without one."""
    return optimizer.read_counts() if isinstance(optimizer, FormAdam) else {}
