"""The directions of the sliced-Wasserstein loss, one function per scheme.

* ``random_projections``: Gaussian directions normalised to unit length, the seed's draw.
* ``orthogonal_projections``: blocks of random orthonormal bases, a variance reduction
  for sliced-Wasserstein estimates (no two directions of a block see the same part of
  the features).
* ``svd_projections``: each view's own right singular vectors of its centred batch, all
  of them or the bottom half, topped up with Gaussian directions shared by the views:
  the official code's ``torch_svd_and_random`` and ``torch_svd_bottom_half_eigen_and_random``.

All draw from the torch generator they are given (or the default one), so a seed fixes
them; none is differentiated (the singular vectors come from detached features, as in
the official code).
"""
import torch


def random_projections(num_projections, dim, device="cpu", *, dtype=None, generator=None):
    """(num_projections, dim) Gaussian directions normalised to unit length, drawn as the seed draws them."""
    projections = torch.randn(num_projections, dim, device=device, dtype=dtype, generator=generator)
    # torch.linalg.vector_norm is Tensor.norm without its Python wrapper (the draw runs at every step).
    return projections / torch.linalg.vector_norm(projections, dim=1, keepdim=True)


def orthogonal_projections(num_projections, dim, device="cpu", *, dtype=None, generator=None):
    """(num_projections, dim) rows in ceil(num_projections / dim) blocks, each block orthonormal.

    Each block is the Q factor of a Gaussian (dim, m) matrix, m = min(dim, the rows still
    needed), with the signs of R's diagonal folded into it: m orthonormal directions
    drawn uniformly (Haar) from the Stiefel manifold, independent between blocks. Every
    direction alone is uniform on the sphere, as a Gaussian one is. The Gaussian matrix
    is drawn in ``dtype`` (default: torch's default) and factored in float64, so the
    rows are orthonormal to the rounding of ``dtype`` (1e-7 in fp32) at any dim; a
    Householder QR in fp32 drifts to ~1e-6 at dim = 2048.
    """
    blocks, remaining = [], num_projections
    while remaining > 0:
        rows = min(dim, remaining)
        gaussian = torch.randn(dim, rows, device=device, dtype=dtype, generator=generator)
        q, r = torch.linalg.qr(gaussian.double())
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1.0
        blocks.append((q * signs).T.to(gaussian.dtype))
        remaining -= rows
    return torch.cat(blocks)


def centred_right_singular_vectors(batch):
    """(V, min(B, D), D) right singular vectors V^T of each centred (B, D) batch of ``batch`` (V, B, D).

    Rows in order of decreasing singular value, computed in ``batch``'s dtype with
    ``torch.linalg.svd(..., full_matrices=False)`` (the official code's call); the
    input is detached.
    """
    batch = batch.detach()
    centred = batch - batch.mean(dim=1, keepdim=True)
    return torch.linalg.svd(centred, full_matrices=False).Vh


def svd_projections(singular_vectors, num_projections, bottom_half=False, *, generator=None):
    """(V, num_projections, D) directions: each view's singular vectors, then shared Gaussian directions.

    singular_vectors: (V, r, D) from ``centred_right_singular_vectors``. 'svd' keeps all r
    rows, 'svd-bottom-half' (``bottom_half``) the rows r // 2 onward (the smallest
    singular values), as the official code slices them. The remaining
    num_projections - rows directions are Gaussian (``random_projections``, drawn from
    ``generator`` in the singular vectors' dtype) and shared by all views. When
    num_projections is below the rows kept, the first num_projections of them are used
    (the official code fails there).
    """
    views, count, dim = singular_vectors.shape
    kept = singular_vectors[:, count // 2 :] if bottom_half else singular_vectors
    kept = kept[:, :num_projections]
    extra = num_projections - kept.shape[1]
    if extra == 0:
        return kept.contiguous()
    shared = random_projections(extra, dim, kept.device, dtype=kept.dtype, generator=generator)
    return torch.cat([kept, shared.expand(views, extra, dim)], dim=1)
