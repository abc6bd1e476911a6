"""The speed switches of a training run on CUDA: mixed-precision dtype, channels_last, torch.compile, fused optimizers, cuDNN autotuning.

``SpeedSettings.resolve(cfg, device)`` turns the flags into what applies on the run's
device: on anything but CUDA every switch is off, so the CPU runs the plain fp32 model
whatever the flags say.
"""
from typing import NamedTuple, Optional

import torch

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class SpeedSettings(NamedTuple):
    """What a run applies. ``amp_dtype``: the autocast dtype, None for fp32; the rest booleans."""

    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    compile: bool
    fused_optimizer: bool
    cudnn_benchmark: bool

    @classmethod
    def resolve(cls, cfg, device):
        cuda = device.type == "cuda"
        amp_dtype = AMP_DTYPES[cfg["amp_dtype"]] if cuda and cfg["amp"] else None
        return cls(
            amp_dtype=amp_dtype,
            channels_last=cuda and bool(cfg["channels_last"]),
            compile=cuda and bool(cfg["compile"]),
            fused_optimizer=cuda and bool(cfg["fused_optimizer"]),
            cudnn_benchmark=cuda and bool(cfg["cudnn_benchmark"]),
        )

    @property
    def amp(self):
        return self.amp_dtype is not None

    @property
    def grad_scaling(self):
        """fp16 needs a GradScaler against underflowing gradients; bf16 has fp32's range and needs none."""
        return self.amp_dtype == torch.float16

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def as_config(self):
        """The settings in config.json's terms (``*_active`` keys)."""
        dtype = {v: k for k, v in AMP_DTYPES.items()}.get(self.amp_dtype)
        return {"amp_active": self.amp, "amp_dtype_active": dtype, "channels_last_active": self.channels_last,
                "compile_active": self.compile, "fused_optimizer_active": self.fused_optimizer,
                "cudnn_benchmark_active": self.cudnn_benchmark}


def prepare_model(model, settings):
    """Apply the model-side switches in place: the cuDNN autotuner, channels_last weights, compiled backbone and projector.

    ``model``: an ``LpJEPA``. ``nn.Module.compile`` compiles in place, so parameter
    names, state dicts and checkpoints stay those of the eager model.
    """
    if settings.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    if settings.compile:
        model.backbone.compile()
        model.projector.compile()
    return model
