"""The optimizers and the learning-rate schedule of pretraining."""
import torch

# timm's LARS as the paper's recipe (solo-learn) runs it.
LARS_MOMENTUM, LARS_TRUST_COEFF = 0.9, 0.02


def build_optimizer(model, cfg, fused=False):
    """AdamW over every parameter (the seed's), or timm's LARS without weight decay or adaptation on biases and norms.

    ``fused``: AdamW's fused step (one kernel for all parameters, CUDA; it also takes the
    GradScaler's inf check without a host sync). timm's LARS has no fused step.
    """
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=fused or None)
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        model, opt="lars", lr=cfg["lr"], weight_decay=cfg["weight_decay"], momentum=LARS_MOMENTUM,
        trust_coeff=LARS_TRUST_COEFF, trust_clip=True,
    )


def build_probe_optimizer(probes, cfg, fused=False):
    """AdamW without weight decay for the online probes, apart from the model's optimizer; ``fused`` as for the model."""
    return torch.optim.AdamW(probes.parameters(), lr=cfg["probe_lr"], weight_decay=0.0, fused=fused or None)


def build_scheduler(optimizer, cfg, steps_per_epoch):
    """timm's per-step cosine schedule after a linear warm-up; None for a constant learning rate.

    The schedule is a function of the step and the config alone, so a resumed run
    rebuilds it instead of loading a saved state (see ``loop.Trainer``).
    """
    if cfg["schedule"] == "constant":
        return None
    from timm.scheduler import CosineLRScheduler

    warmup = cfg["warmup_epochs"] * steps_per_epoch
    return CosineLRScheduler(
        optimizer, t_initial=max(1, cfg["epochs"] * steps_per_epoch - warmup), warmup_t=warmup,
        warmup_prefix=True, warmup_lr_init=0.0, lr_min=0.0, t_in_epochs=False,
    )
