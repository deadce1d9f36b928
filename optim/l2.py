"""The paper's L2: a loss term λ||w||^2 over the decayed weights, backpropagated before clipping.

Why gradient hooks and not a term added to the loss: under ZeRO 3 a weight is whole only while
its module runs (forward, and backward again), so ||w||^2 cannot be taken outside the model's
forward. The term's gradient, 2λw, is known, and a hook on each decayed weight adds it to the
weight's gradient as backward computes it, while the weight is gathered and before DeepSpeed
reduces, averages, measures and clips. That is the loss term's gradient exactly: every micro-step
of every rank adds 2λw/accum (DeepSpeed scales each micro-step's loss by 1/accum and averages the
ranks), so the step's gradient holds 2λw once, and the pre-clip grad norm includes it.
"""

import torch

from configs.schema import TrainConfig


def add_l2_loss_grad(decay_params: list[torch.nn.Parameter], cfg: TrainConfig) -> list:
    """For `optim.l2_form=loss`: hook the loss term's gradient onto `decay_params`; the hook
    handles (none for any other form)."""
    o = cfg.optim
    if o.name != "adam_l2" or o.l2_form != "loss" or o.weight_decay == 0:
        return []
    coef = o.l2_grad_coef / cfg.train.grad_accum_steps

    def hook(param: torch.nn.Parameter):
        return lambda grad: grad + coef * param.detach().to(grad.dtype)

    return [p.register_hook(hook(p)) for p in decay_params]
