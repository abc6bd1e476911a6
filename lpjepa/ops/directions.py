"""The directions of the sliced-Wasserstein loss, one function per scheme.

* ``random_projections``: Gaussian directions normalised to unit length, the seed's draw
  (on the Triton backend ``RDMReg`` draws the same law with its target, in one launch of the
  sampler: ``lpjepa.ops.rgg_sample.triton_draw``).
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
import warnings

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
    ``torch.linalg.svd(..., full_matrices=False)`` (the official code's call); the input is
    detached. The choice is made deterministic for a given input (``canonical_singular_vectors``):
    each vector's sign is fixed, and the rows of (numerically) zero singular value, which the SVD
    leaves arbitrary (with B <= D the centred batch has rank B - 1 at most, so the last row is
    one), are derived from the row space alone.

    A failed SVD never stops a run. It falls back, with a warning that names the cause, to
    ``torch.linalg.eigh`` of the D x D covariance in float64 (the same subspaces, rows and signs
    chosen by the same rule; the official code tries LOBPCG, then eigh), and, when that fails too
    (non-finite features, where the loss is NaN whatever the directions), to the first min(B, D)
    coordinate axes.
    """
    batch = batch.detach()
    centred = batch - batch.mean(dim=1, keepdim=True)
    try:
        singular_values, vh = torch.linalg.svd(centred, full_matrices=False)[1:]
        noise = 0.0
    except RuntimeError as error:  # torch.linalg.LinAlgError, or a backend's failure to converge
        singular_values, vh, noise = _covariance_eigenvectors(centred, error)
    return canonical_singular_vectors(vh, singular_values, rows=centred.shape[1], noise=noise)


def _covariance_eigenvectors(centred, svd_error):
    """(singular values, V^T, their relative noise) of ``centred`` (V, B, D) from eigh of its covariance.

    The covariance squares the singular values, so in float64 those below sqrt(D * eps) of the
    largest are noise: ``noise`` is that floor, which ``canonical_singular_vectors`` treats as zero.
    """
    views, rows, dim = centred.shape
    count = min(rows, dim)
    cause = f"{type(svd_error).__name__.lstrip('_')}: {str(svd_error).splitlines()[0] if str(svd_error) else ''}"
    try:
        covariance = centred.double().transpose(1, 2) @ centred.double()
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    except RuntimeError as eigh_error:
        warnings.warn(
            f"torch.linalg.svd failed on the centred ({rows}, {dim}) batch ({cause}), and so did torch.linalg.eigh "
            f"of its covariance ({type(eigh_error).__name__.lstrip('_')}); the SVD directions are the first {count} coordinate "
            "axes for this call. Non-finite features are the usual cause: the loss is NaN whatever the directions.",
            RuntimeWarning, stacklevel=3,
        )
        axes = torch.eye(count, dim, dtype=centred.dtype, device=centred.device).expand(views, count, dim)
        return torch.zeros(views, count, dtype=centred.dtype, device=centred.device), axes.contiguous(), 0.0
    warnings.warn(
        f"torch.linalg.svd failed on the centred ({rows}, {dim}) batch ({cause}); the SVD directions come from "
        "torch.linalg.eigh of its covariance in float64 instead (the same subspaces, the same sign and "
        "null-space rule).",
        RuntimeWarning, stacklevel=3,
    )
    eigenvalues, eigenvectors = eigenvalues.flip(-1)[:, :count], eigenvectors.flip(-1)[:, :, :count]
    singular_values = eigenvalues.clamp_min(0).sqrt()
    vh = eigenvectors.transpose(1, 2)
    return singular_values.to(centred.dtype), vh.to(centred.dtype), (dim * torch.finfo(torch.float64).eps) ** 0.5


def canonical_singular_vectors(vh, singular_values, rows, noise=0.0):
    """The rows of ``vh`` (V, r, D) made a function of the input alone, whichever algorithm found them.

    singular_values: (V, r), decreasing. A row whose singular value is at most
    ``max(rows, D) * eps * s_max`` (numpy's matrix-rank tolerance) or ``noise * s_max`` is in the
    null space of the centred batch, where any orthonormal completion is an SVD: those rows are
    replaced by the deterministic completion of the others' span, each coordinate axis in turn
    whose remaining component is largest, its part orthogonal to the rows already chosen,
    normalised. Every other row's sign is fixed so that its entry of largest magnitude is positive
    (ties: the first). The loss does not change with a sign: negating a direction negates every
    residual. Computed in float64, returned in ``vh``'s dtype.
    """
    views, count, dim = vh.shape
    floor = max(max(rows, dim) * torch.finfo(vh.dtype).eps, noise)
    largest = singular_values.max(dim=1, keepdim=True).values
    in_row_space = singular_values > floor * largest  # (V, r); False for all-zero or non-finite values
    out = vh.double()
    largest_entry = out.abs().argmax(dim=2, keepdim=True)
    signs = torch.where(torch.gather(out, 2, largest_entry) < 0, -1.0, 1.0)
    out = torch.where(in_row_space[:, :, None], out * signs, out)
    null_counts = (~in_row_space).sum(dim=1).tolist()  # one host sync; the SVD has made one already
    for view, nulls in enumerate(null_counts):
        if nulls:
            kept = out[view, : count - nulls]
            out[view, count - nulls :] = _completion(kept, nulls)
    return out.to(vh.dtype)


def _completion(rows, count):
    """``count`` orthonormal (D,) vectors orthogonal to the orthonormal ``rows`` (k, D), chosen deterministically.

    Without forming the D x D projector onto the complement: its diagonal is 1 minus the columns'
    squared norms, and its column at axis i is e_i minus the rows' combination, O(k D) per vector.
    """
    basis = rows
    chosen = []
    for _ in range(count):
        # The axis with the largest component left: its column of the projector has norm sqrt(diagonal).
        axis = (1.0 - basis.square().sum(dim=0)).argmax().reshape(1)
        column = -(basis.T @ basis.index_select(1, axis)[:, 0])
        column.index_add_(0, axis, torch.ones(1, dtype=column.dtype, device=column.device))
        vector = column / column.norm()
        chosen.append(vector)
        basis = torch.cat([basis, vector[None]])
    return torch.stack(chosen)


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
