"""The random directions of the sliced-Wasserstein loss."""
import torch


def random_projections(num_projections, dim, device="cpu", *, dtype=None, generator=None):
    """(num_projections, dim) Gaussian directions normalised to unit length, drawn as the seed draws them."""
    projections = torch.randn(num_projections, dim, device=device, dtype=dtype, generator=generator)
    return projections / projections.norm(dim=1, keepdim=True)
