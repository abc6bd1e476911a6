"""The Triton backend: autograd over the launchers in ``lpjepa.kernels``.

``lpjepa._dispatch`` loads this module for ``backend='triton'`` (and for CUDA tensors
under ``'auto'``); importing it fails cleanly where Triton is missing. The forward is
the fused projection + sort + residual kernel; the backward is one matmul,
2 / (B K) * residual^T @ projections, exactly as in the torch backend.
"""
import torch

from .kernels import rgg as _rgg
from .kernels import swd as _swd

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonSlicedWasserstein(torch.autograd.Function):
    """z (B, D), target (B, D), projections (K, D) -> 0-dim float32 loss."""

    @staticmethod
    def forward(ctx, z, target, projections):
        need_target_residual = ctx.needs_input_grad[1]
        # The kernels read fp32/fp16/bf16 and accumulate in fp32; fp64 is computed in fp32.
        loss, residual_z, residual_t = _swd.swd_forward(
            *(t if t.dtype in _KERNEL_DTYPES else t.float() for t in (z, target, projections)),
            need_target_residual=need_target_residual,
        )
        ctx.dtypes = (z.dtype, target.dtype, projections.dtype)
        ctx.save_for_backward(residual_z, residual_t, projections, z, target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        residual_z, residual_t, projections, z, target = ctx.saved_tensors
        z_dtype, target_dtype, projections_dtype = ctx.dtypes
        scale = grad_loss.float() * (2.0 / residual_z.numel())
        P = projections.float()
        grad_z = grad_target = grad_projections = None
        with torch.autocast(residual_z.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_z = (residual_z.T @ P).mul_(scale).to(z_dtype)
            if ctx.needs_input_grad[1]:
                grad_target = (residual_t.T @ P).mul_(scale).to(target_dtype)
            if ctx.needs_input_grad[2]:
                grad_projections = residual_z @ z.float()
                if residual_t is not None:
                    grad_projections += residual_t @ target.float()
                grad_projections = grad_projections.mul_(scale).to(projections_dtype)
        return grad_z, grad_target, grad_projections


def sliced_wasserstein(z, target, projections):
    """The sliced-Wasserstein loss of one view on the Triton kernels (see lpjepa.loss)."""
    with torch.autocast(z.device.type, enabled=False):
        return TritonSlicedWasserstein.apply(z, target, projections)


def sample_rgg(shape, *, p, mu, sigma, dtype, device, generator=None):
    """RGG samples from the Triton kernel, seeded from ``generator`` or the device's default one."""
    kernel_dtype = dtype if dtype in _KERNEL_DTYPES else torch.float32
    numel = 1
    for size in shape:
        numel *= size
    seed, offset = _rgg.philox_seed_offset(_rgg.rgg_philox_increment(numel), device, generator)
    out = _rgg.rgg_sample(shape, p=p, mu=mu, sigma=sigma, dtype=kernel_dtype, device=device, seed=seed, offset=offset)
    return out.to(dtype)
