"""The optimizers and the learning-rate schedule of pretraining.

LARS and the warm-up-then-cosine schedule follow solo-learn as the official run uses them
(YilunKuang/rectified-lp-jepa@5ae61ab: solo/utils/lars.py, solo/utils/lr_scheduler.py,
solo/methods/base.py); ``--lr-scaling linear`` is solo/args/pretrain.py's scaling of the
learning rates by the global batch.
"""
import math

import torch

# solo-learn's LARS: eps of the trust ratio's denominator (solo/utils/lars.py's default).
LARS_EPS = 1e-8
# --lr-scaling linear: the learning rates are given for this global batch (solo/args/pretrain.py).
LR_REFERENCE_BATCH = 256


def lr_scale(cfg):
    """The factor on ``--lr`` and ``--probe-lr``: global batch / 256 under ``--lr-scaling linear``, else 1.

    solo-learn multiplies by ``batch per device x devices x nodes / 256``, the global batch / 256.
    """
    return cfg["batch_size"] / LR_REFERENCE_BATCH if cfg["lr_scaling"] == "linear" else 1.0


def effective_lr(cfg, key="lr"):
    """The learning rate the run uses for ``key`` ('lr' or 'probe_lr'): the flag's value times ``lr_scale``."""
    return cfg[key] * lr_scale(cfg)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and LARS's layer-wise rate, as solo-learn's LARS computes it.

    Per parameter p with gradient g, unless it is 1-d and ``exclude_bias_n_norm`` is set
    (then g is used as it is, without weight decay), and only where ``||p||`` and ``||g||``
    are both non-zero::

        rate = eta * ||p|| / (||g|| + weight_decay * ||p|| + eps)
        rate = min(rate / lr, 1)                    # clip_lr
        g    = (g + weight_decay * p) * rate

    then ``buf = momentum * buf + g`` (``buf = g`` at the first step) and
    ``p -= lr * buf``. Computed on the device, without reading the norms on the host.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=1e-3, eps=LARS_EPS, clip_lr=False,
                 exclude_bias_n_norm=False):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS needs lr, momentum, weight_decay >= 0 and eta > 0; got {lr}, {momentum}, {weight_decay}, {eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, clip_lr=clip_lr,
                        exclude_bias_n_norm=exclude_bias_n_norm)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim != 1 or not group["exclude_bias_n_norm"]:
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    rate = group["eta"] * p_norm / (g_norm + decay * p_norm + group["eps"])
                    if group["clip_lr"]:
                        # lr 0 (the cosine's end) makes rate / lr infinite: clipped to 1, as in solo-learn.
                        rate = torch.clamp(rate / lr, max=1.0)
                    scaled = (update + decay * p) * rate
                    update = torch.where((p_norm > 0) & (g_norm > 0), scaled, update)
                state = self.state[p]
                if group["momentum"] != 0:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = update.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                    update = state["momentum_buffer"]
                p.add_(update, alpha=-lr)
        return loss


def _lars(params, cfg, lr, weight_decay):
    return LARS(params, lr=lr, momentum=cfg["momentum"], weight_decay=weight_decay, eta=cfg["lars_eta"],
                clip_lr=cfg["lars_clip"], exclude_bias_n_norm=cfg["lars_exclude_bias_norm"])


def build_optimizer(model, cfg, fused=False):
    """AdamW over every parameter (the seed's), or solo-learn's LARS (``LARS``) with the run's settings.

    The learning rate is ``effective_lr(cfg)``. ``fused``: AdamW's fused step (one kernel
    for all parameters, CUDA; it also takes the GradScaler's inf check without a host
    sync). LARS has no fused step.
    """
    lr = effective_lr(cfg, "lr")
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg["weight_decay"], fused=fused or None)
    return _lars(model.parameters(), cfg, lr, cfg["weight_decay"])


def build_probe_optimizer(probes, cfg, fused=False):
    """The online probes' optimizer, apart from the model's, never with weight decay.

    'adamw': AdamW at ``--probe-lr``. 'lars': solo-learn's online classifier, a parameter
    group of the model's LARS at ``classifier_lr`` with ``weight_decay`` 0 (solo/methods/base.py,
    ``learnable_params``); LARS works per parameter, so a LARS of its own with the same
    settings and the same schedule (``build_scheduler``) steps it exactly as that group.
    """
    lr = effective_lr(cfg, "probe_lr")
    if cfg["probe_optimizer"] == "lars":
        return _lars(probes.parameters(), cfg, lr, 0.0)
    return torch.optim.AdamW(probes.parameters(), lr=lr, weight_decay=0.0, fused=fused or None)


def warmup_cosine_lr(step, base_lr, warmup_steps, total_steps, start_lr=0.0, min_lr=0.0):
    """The learning rate of step ``step`` (counted from 0): solo-learn's ``LinearWarmupCosineAnnealingLR`` per step.

    A linear ramp from ``start_lr`` at step 0 to ``base_lr`` at step ``warmup_steps - 1``,
    then ``min_lr + (base_lr - min_lr) (1 + cos(pi (step - warmup) / (total - warmup))) / 2``,
    which is ``min_lr`` from step ``total_steps`` on.
    """
    if step < warmup_steps:
        return start_lr + step * (base_lr - start_lr) / max(warmup_steps - 1, 1)
    if step >= total_steps:
        return min_lr
    progress = min(step - warmup_steps, total_steps - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets every parameter group's learning rate to ``warmup_cosine_lr`` of the step, from the group's lr at creation.

    ``step_update(step)`` before step ``step`` runs; created at step 0. The schedule is a
    function of the step and the config alone, so a resumed run rebuilds it (``loop.TrainState``).
    """

    def __init__(self, optimizer, warmup_steps, total_steps, start_lr=0.0, min_lr=0.0):
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.warmup_steps, self.total_steps, self.start_lr, self.min_lr = warmup_steps, total_steps, start_lr, min_lr
        self.step_update(0)

    def step_update(self, step):
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = warmup_cosine_lr(step, base, self.warmup_steps, self.total_steps, self.start_lr, self.min_lr)


def build_scheduler(optimizer, cfg, steps_per_epoch):
    """``WarmupCosine`` over the run's steps (warm-up ``--warmup-epochs``); None for a constant learning rate."""
    if cfg["schedule"] == "constant":
        return None
    return WarmupCosine(optimizer, cfg["warmup_epochs"] * steps_per_epoch, cfg["epochs"] * steps_per_epoch,
                        cfg["warmup_start_lr"], cfg["min_lr"])


def build_probe_scheduler(probe_optimizer, cfg, steps_per_epoch):
    """The probes follow the model's schedule when they are solo-learn's classifier (``--probe-optimizer lars``)."""
    return build_scheduler(probe_optimizer, cfg, steps_per_epoch) if cfg["probe_optimizer"] == "lars" else None
