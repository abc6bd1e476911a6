"""Sparsity metrics for (N, D) representations, as reported in the paper."""
import torch


def _check_2d(z):
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D tensor (samples, dim); got {getattr(z, 'shape', type(z).__name__)}")


def zero_fraction(z):
    """Measured fraction of entries of z that are exactly zero (0.0 = dense, 1.0 = all zero).

    The prior's expected fraction is ``lpjepa.rgg.expected_zero_fraction(p, mu)``.
    """
    _check_2d(z)
    return (z == 0).float().mean().item()


def l0_metric(z):
    """The paper's l0 metric: fraction of active (non-zero) entries; 1.0 = dense."""
    _check_2d(z)
    return (z != 0).float().mean().item()


def l1_metric(z, eps=1e-12):
    """The paper's l1 metric, (||z||_1 / ||z||_2)^2 / D averaged over rows.

    It is 1.0 for a vector with equal-magnitude entries and 1/D for a one-hot vector;
    an all-zero row counts as 0.
    """
    _check_2d(z)
    z = z.float()
    l1 = z.abs().sum(dim=1)
    l2 = z.norm(dim=1)
    ratio = torch.where(l2 > eps, (l1 / l2.clamp_min(eps)) ** 2 / z.shape[1], torch.zeros_like(l1))
    return ratio.mean().item()


def active_units(z):
    """(D,) bool mask of the units that are non-zero for at least one row of z.

    Combine batches with ``|`` to track units over a whole set.
    """
    _check_2d(z)
    return (z != 0).any(dim=0)


def dead_units(z=None, *, ever_active=None):
    """Number of units never active over a set.

    Pass all the set's features as ``z`` (N, D), or the ``|``-combined
    ``active_units`` masks of its batches as ``ever_active``.
    """
    if ever_active is None:
        if z is None:
            raise ValueError("dead_units needs z (N, D) or ever_active (D,)")
        ever_active = active_units(z)
    return int((~ever_active).sum().item())


def sparsity_report(z):
    """All metrics of one (N, D) batch as a dict of floats."""
    return {
        "zero_fraction": zero_fraction(z),
        "l0": l0_metric(z),
        "l1": l1_metric(z),
        "dead_units": dead_units(z),
    }


# VICReg's variance term: the hinge target of each dimension's standard deviation, and the
# epsilon under its square root (Bardes et al. 2022; solo-learn's variance_loss).
VICREG_STD_TARGET = 1.0
VICREG_EPS = 1e-4


def vicreg_variance(z):
    """VICReg's variance term of a (N, D) batch, mean over dims of relu(1 - sqrt(Var_n[z_d] + 1e-4)).

    The unbiased variance over the batch, as VICReg defines it; 0 once every dimension
    has a standard deviation of at least 1. Returns a 0-dim float32 tensor on z's device
    (no host sync, for accumulating every step); computed on the detached values.
    """
    _check_2d(z)
    z = z.detach().float()
    std = torch.sqrt(z.var(dim=0) + VICREG_EPS)
    return torch.relu(VICREG_STD_TARGET - std).mean()


def vicreg_covariance(z):
    """VICReg's covariance term of a (N, D) batch: the squared off-diagonal entries of its covariance, summed, over D.

    The covariance is the unbiased one of the centred batch, (z - mean)^T (z - mean) / (N - 1).
    Returns a 0-dim float32 tensor on z's device (no host sync); computed on the detached values.
    """
    _check_2d(z)
    z = z.detach().float()
    centred = z - z.mean(dim=0)
    covariance = centred.T @ centred / (z.shape[0] - 1)
    off_diagonal = covariance.square().sum() - covariance.diagonal().square().sum()
    return off_diagonal / z.shape[1]
