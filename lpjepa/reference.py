"""The seed's math, kept as the oracle every fast path is tested against.

This module restates ``rectified_lpjepa_minimal.md`` (sections 2-4) without changing
its meaning: the Gamma variates are drawn on the CPU and copied, the sliced-Wasserstein
loss goes through ``torch.sort`` and autograd. It never calls the fast paths.

The only additions are keywords that let tests pin the randomness: ``projections=``
(fixed directions) and ``generator=`` on the loss, ``dtype=`` on the sampler. The package
itself never imports this module: it is the oracle of the tests and the baseline of
the benchmarks. timm is imported where the seed's model is built, so the math alone
needs none.
"""
import math

import torch
import torch.nn as nn


class Projector(nn.Module):
    """The seed's 3-layer MLP projector of constant width, ending in a ReLU.

    (N, dim) -> (N, dim), non-negative. The final ReLU is what produces l0 sparsity.
    """

    def __init__(self, dim=512):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(dim, dim),
            nn.BatchNorm1d(dim),
            nn.ReLU(),
            nn.Linear(dim, dim),
            nn.BatchNorm1d(dim),
            nn.ReLU(),
            nn.Linear(dim, dim),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.model(x)


class RectifiedLpJEPA(nn.Module):
    """The seed's model: a timm backbone without its classifier, then the projector.

    (N, 3, H, W) images -> (N, dim) non-negative features.
    """

    def __init__(self, backbone_name="resnet18", dim=512):
        super().__init__()
        import timm

        self.backbone = timm.create_model(backbone_name, pretrained=False, num_classes=0)
        self.projector = Projector(dim=dim)

    def forward(self, x):
        return self.projector(self.backbone(x))


def sigma_gn(p):
    """Scale that gives GN_p unit variance before rectification (the seed's choice)."""
    return math.sqrt(math.gamma(1 / p) / math.gamma(3 / p)) / (p ** (1 / p))


def sample_rgg(shape, p=1.0, mu=0.0, device="cpu", *, dtype=None):
    """Samples ReLU(mu + sigma * GN_p) exactly as the seed does.

    The sign comes from a Bernoulli(0.5) on ``device``; the Gamma(1/p) variates are
    drawn on the CPU by ``torch.distributions.Gamma`` and copied to ``device``.
    Returns a tensor of ``shape`` in ``dtype`` (default: torch's default dtype).
    """
    sigma = sigma_gn(p)
    sign = torch.empty(shape, device=device).bernoulli_(0.5) * 2 - 1
    gamma_dist = torch.distributions.Gamma(concentration=1.0 / p, rate=1.0)
    g = gamma_dist.sample(shape).to(device)
    gn_samples = sign * (p * g).pow(1.0 / p)
    out = torch.relu(mu + sigma * gn_samples)
    return out if dtype is None else out.to(dtype)


def random_projections(num_projections, dim, device="cpu", *, dtype=None, generator=None):
    """(num_projections, dim) Gaussian directions normalised to unit length, as the seed draws them."""
    projections = torch.randn(num_projections, dim, device=device, dtype=dtype, generator=generator)
    return projections / projections.norm(dim=1, keepdim=True)


def rdmreg_loss(z, target_samples, num_projections=256, *, projections=None, generator=None):
    """The seed's sliced-Wasserstein RDMReg loss.

    z, target_samples: (B, D). projections: optional (K, D) unit directions; when
    omitted, ``num_projections`` are drawn as the seed does. Returns the mean over
    batch and projections of the squared difference of the sorted projections.
    Gradients flow through ``torch.sort`` by autograd.
    """
    B, D = z.shape
    if projections is None:
        projections = random_projections(num_projections, D, z.device, generator=generator)
    proj_z = torch.matmul(z, projections.T)
    proj_target = torch.matmul(target_samples, projections.T)
    proj_z_sorted, _ = torch.sort(proj_z, dim=0)
    proj_target_sorted, _ = torch.sort(proj_target, dim=0)
    return torch.mean((proj_z_sorted - proj_target_sorted) ** 2)
