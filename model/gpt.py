"""GPT-2 language model, after nanoGPT's model.py, with optional qk-layernorm, z-loss and telemetry.

Letters: B batch, T time (sequence), C channels (n_embd), V vocab, nh heads, hs head size (C // nh).

References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
   https://github.com/openai/gpt-2/blob/master/src/model.py
2) Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities"
   (qk-layernorm, z-loss and the attention-logit growth that telemetry watches).
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

from model.config import ModelConfig
from model.flash import flash_forward, tie_rows, to_bf16
from model.flash import scores as flash_scores


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's nn.LayerNorm cannot drop just the bias)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through SDPA (flash / memory-efficient kernels)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, in one batched matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection back into the residual stream
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # qk-layernorm normalises each head's queries and keys, which bounds the attention logits
        # (Wortsman et al. 2023); it is a LayerNorm over hs, shared by all heads
        head_size = config.n_embd // config.n_head
        self.q_ln = LayerNorm(head_size, config.bias) if config.qk_layernorm else None
        self.k_ln = LayerNorm(head_size, config.bias) if config.qk_layernorm else None
        self.softcap = config.attn_softcap

    def forward(self, x: torch.Tensor, readings: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of x (B, T, C); with `readings` (4,), telemetry fills it (`_read_scores`)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_ln is not None:
            q, k = self.q_ln(q), self.k_ln(k)
        # SDPA never materialises the scores, so telemetry recomputes them; ordinary calls skip it
        if readings is not None:
            self._read_scores(q, k, readings, self.softcap)
        dropout = self.dropout if self.training else 0.0
        if self.softcap:
            y = _softcapped_attention(q, k, v, self.softcap, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        # (B, nh, T, hs); delta needs dO, read in the backward: FA2's, so not when capped
        if readings is not None and y.requires_grad and not self.softcap:
            y.register_hook(partial(_read_delta, q.detach(), k.detach(), v.detach(), readings))
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): re-assemble the heads
        return self.resid_dropout(self.c_proj(y))

    @staticmethod
    @torch.no_grad()
    def _read_scores(
        q: torch.Tensor, k: torch.Tensor, readings: torch.Tensor, softcap: float = 0.0
    ) -> None:
        """readings[0]: max |attention logit| (after the soft cap, when on: what the softmax
        sees), in fp32 so bf16 rounding does not hide growth; readings[1]: the fraction of rows
        with a tie as FA2 sees it (two or more P_bar that round to 1, from bf16 q and k:
        model/flash.py), over all heads and positions.

        One sequence at a time: the fp32 score matrices of a whole batch are 805 MB per layer
        at GPT-2 124M and 16 x 1024 tokens, one sequence's 50 MB. Outside autocast, which
        would run these matmuls in bf16.
        """
        T, scale = q.size(-2), q.size(-1) ** -0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T)
        largest, ties = [], []
        with torch.autocast(q.device.type, enabled=False):
            for q1, k1 in zip(q.float(), k.float(), strict=True):  # (nh, T, hs) each
                scores = _cap((q1 @ k1.transpose(-2, -1)) * scale, softcap)  # (nh, T, T)
                # masked entries become 0, which never wins the max of absolute values
                largest.append(scores.abs().masked_fill(~causal, 0.0).amax())
                fa2 = flash_scores(to_bf16(q1), to_bf16(k1), scale, True)  # -inf above diagonal
                ties.append(tie_rows(fa2.where(fa2.isinf(), _cap(fa2, softcap))).sum())
        readings[0] = torch.stack(largest).amax()
        readings[1] = torch.stack(ties).sum() / (q.size(0) * q.size(1) * T)

    @torch.no_grad()
    def qk_spectral_norms(self) -> torch.Tensor:
        """(2, nh): the spectral norms of each head's W_Q and W_K, the (hs, C) slices of c_attn's
        weight whose product bounds that head's logits (qk-layernorm's gains not included)."""
        C, nh = self.n_embd, self.n_head
        w_q, w_k = self.c_attn.weight[: 2 * C].float().view(2, nh, C // nh, C).unbind(0)
        return torch.linalg.matrix_norm(torch.stack([w_q, w_k]), ord=2)


def _cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Soft-capping (Gemma 2): cap * tanh(x / cap), ~x well below the cap, never past it;
    x itself when `cap` is 0 (off)."""
    return cap * torch.tanh(x / cap) if cap else x


def _softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float, dropout: float
) -> torch.Tensor:
    """Causal attention with soft-capped logits, as explicit ops: SDPA's kernels take no
    function of the scores (a GPU would use FlexAttention's score_mod for this)."""
    T = q.size(-2)
    scores = _cap((q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5, cap)  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T)
    probs = torch.softmax(scores.float().masked_fill(~causal, -math.inf), dim=-1).to(v.dtype)
    return F.dropout(probs, dropout) @ v  # (B, nh, T, hs)


@torch.no_grad()
def _read_delta(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, readings: torch.Tensor, grad: torch.Tensor
) -> None:
    """A backward hook on attention's output: FA2's delta error against an fp32 shadow.

    delta_bf16 = rowsum(dO * O_bf16) as FA2 forms it from its stored bf16 O; delta_fp32 from the
    fp32 attention (fp32 softmax, no rounding of P) of the same bf16 q, k, v. readings[2]: mean
    of (delta_bf16 - delta_fp32) over rows, relative to mean |delta_fp32| (so readings compare
    across steps whatever the gradient's scale); readings[3]: its sign coherence, sum / sum of
    |.|: near +-1 when the rows err one way (Qiu & Yao's mechanism), near 0 when at random.
    Always FA2's (`bf16_flash: fa2`) whatever the run computes: what a GPU's flash kernel would
    put into delta at these weights, so an fp32 or native run reads on the same scale.
    """
    q, k, v = (to_bf16(t.float()) for t in (q, k, v))
    d_out = to_bf16(grad.float())
    scale = q.size(-1) ** -0.5
    fa2 = flash_forward(q, k, v, scale, "fa2", is_causal=True)
    shadow = torch.softmax(flash_scores(q, k, scale, True), dim=-1) @ v  # (B, nh, T, hs)
    delta_fp32 = (d_out * shadow).sum(-1)  # (B, nh, T)
    error = (d_out * fa2.out).sum(-1) - delta_fp32  # (B, nh, T)
    readings[2] = error.mean() / delta_fp32.abs().mean().clamp_min(1e-30)
    readings[3] = error.sum() / error.abs().sum().clamp_min(1e-30)


class MLP(nn.Module):
    """Position-wise feed-forward network with 4x expansion."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 uses the tanh approximation of GELU; matching it keeps HF imports exact
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, readings: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), readings)
        return x + self.mlp(self.ln_2(x))


@dataclass
class GPTOutput:
    """What one forward returns.

    Attributes:
        logits: (B, T, V) next-token logits.
        loss: scalar mean cross-entropy (+ z-loss when configured); None without targets.
        log_z: detached scalar, mean over positions (with targets) of logsumexp(logits); None
            unless telemetry asked for it.
        softmax_collapse: detached fp32 (2,), with telemetry and targets: over the first
            sequence, the fraction of positions whose top probability is 1.0 and the mean
            zero-sum residual of the logits' gradient (see `GPT._softmax_collapse`).
        attn_logit_max: detached fp32 (n_layer,), per layer max |q.k/sqrt(hs)| over the causal
            scores; None unless telemetry.
        attn_flash: detached fp32 (n_layer, 3), with telemetry, per layer: the fraction of
            rows with an FA2 tie, then (filled by the backward; NaN without one) FA2's relative
            delta bias and its sign coherence (`CausalSelfAttention._read_scores`, `_read_delta`).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    log_z: torch.Tensor | None = None
    softmax_collapse: torch.Tensor | None = None
    attn_logit_max: torch.Tensor | None = None
    attn_flash: torch.Tensor | None = None


class GPT(nn.Module):
    """GPT-2 with GPT-2's parameter names, so Hugging Face weights map over with a transpose."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: one matrix embeds tokens and scores them, which saves V*C parameters
        # and is what GPT-2 does
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block adds two of
        # them to the residual stream, and this keeps its variance from growing with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the tied wte/lm_head matrix counts once.

        Args:
            non_embedding: subtract the position embeddings (as nanoGPT does). The token
                embeddings stay in because, tied, they are also the output layer's weights.
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B as in nanoGPT's MFU.

        6N covers the parameter matmuls; 12*L*H*hs*T covers the attention scores and the
        weighted sum of values at full context length T.
        """
        cfg = self.config
        N = self.num_params(non_embedding=True)
        L, H, hs, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return float(6 * N + 12 * L * H * hs * T)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, telemetry: bool = False
    ) -> GPTOutput:
        """Runs the model on token ids (B, T); targets (B, T) use -1 for positions to ignore."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence {T} > block_size {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        # each layer writes its telemetry into a row: the forward's now, the backward's later
        readings = (
            torch.full((self.config.n_layer, 4), torch.nan, device=idx.device)
            if telemetry
            else None
        )  # (n_layer, 4)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, None if readings is None else readings[layer])
        logits = _cap(
            self.lm_head(self.transformer.ln_f(x)), self.config.output_softcap
        )  # (B, T, V)

        out = GPTOutput(logits=logits)
        if readings is not None:
            out.attn_logit_max, out.attn_flash = readings[:, 0], readings[:, 1:]
        if targets is None and not telemetry:
            return out
        # softmax statistics in fp32: under bf16 autocast a sum over 50k logits loses too much;
        # one copy shared by log Z and the loss (a no-op when the logits are already fp32)
        logits_f = logits.float()  # (B, T, V)
        per_position = self.config.z_loss > 0 or targets is None
        log_z = torch.logsumexp(logits_f, dim=-1) if per_position else None  # (B, T)
        if targets is not None:
            out.loss = self._loss(logits_f, targets, log_z)
        if telemetry and targets is not None:
            out.softmax_collapse = self._softmax_collapse(logits_f, targets)
        if telemetry and log_z is not None:
            out.log_z = log_z.mean().detach()
        elif telemetry:
            # cross-entropy is mean(log Z - target logit): its mean log Z costs one gather, not
            # a second pass over the vocabulary
            valid = targets != -1  # (B, T)
            target_logit = logits_f.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            mean_target = torch.where(valid, target_logit, 0.0).sum() / valid.sum()
            out.log_z = (out.loss + mean_target).detach()
        return out

    @staticmethod
    @torch.no_grad()
    def _softmax_collapse(logits_f: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(fraction of positions whose top probability is exactly 1, mean zero-sum residual)
        over the first sequence, in fp32, the dtype the loss and its gradient are computed in.

        The cross-entropy gradient on the logits, softmax - onehot, sums to zero over the
        vocabulary; once the target's probability rounds to 1 (softmax collapse) it no longer
        does, and |sum_v g_v| / sum_v |g_v| rises from ~0 towards 1. One sequence is a sample
        that keeps this at a few passes over T x V values, not B x T x V.
        """
        probs = torch.softmax(logits_f[:1], dim=-1)  # (1, T, V)
        index = targets[:1].clamp(min=0).unsqueeze(-1)  # (1, T, 1)
        valid = targets[:1] != -1  # (1, T)
        saturated = (probs.amax(dim=-1) == 1.0).float()  # (1, T)
        target_prob = probs.gather(-1, index).squeeze(-1)  # (1, T)
        # the other classes' mass, summed without the ~1 of the target that would absorb it
        others = probs.scatter_(-1, index, 0.0).sum(dim=-1)  # (1, T)
        missing = 1 - target_prob  # |the target's gradient|
        residual = (others - missing).abs() / (others + missing).clamp_min(1e-30)  # (1, T)
        count = valid.sum().clamp_min(1)
        return torch.stack(
            [
                torch.where(valid, saturated, 0.0).sum() / count,
                torch.where(valid, residual, 0.0).sum() / count,
            ]
        )

    def _loss(
        self, logits_f: torch.Tensor, targets: torch.Tensor, log_z: torch.Tensor | None
    ) -> torch.Tensor:
        """Mean cross-entropy, plus z_loss * mean(log Z^2) over the positions that have targets."""
        V = logits_f.size(-1)
        loss = F.cross_entropy(logits_f.view(-1, V), targets.reshape(-1), ignore_index=-1)
        if self.config.z_loss > 0:
            # z-loss (PaLM) pulls log Z towards 0, so the logits cannot drift off together;
            # a masked sum rather than log_z[valid], whose boolean indexing syncs with the host
            valid = targets != -1  # (B, T)
            z_sq = torch.where(valid, log_z.square(), 0.0).sum() / valid.sum()
            loss = loss + self.config.z_loss * z_sq
        return loss
