"""Bad input gets an error that names the argument."""
import pytest
import torch

import lpjepa

Z = torch.randn(8, 4)
T = torch.rand(8, 4)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(z=torch.randn(8)), ValueError, "z must be 2-D"),
        (dict(z=torch.randn(2, 8, 4), target_samples=torch.rand(2, 8, 4)), ValueError, "z must be 2-D"),
        (dict(target_samples=torch.rand(8, 5)), ValueError, "target_samples must have the shape"),
        (dict(z=torch.randn(0, 4), target_samples=torch.rand(0, 4)), ValueError, "at least 1 row"),
        (dict(num_projections=0), ValueError, "num_projections must be >= 1"),
        (dict(num_projections=2.5), TypeError, "num_projections must be an int"),
        (dict(projections=torch.randn(16, 5)), ValueError, "projections must have shape"),
        (dict(projections=torch.randn(16)), ValueError, "projections must have shape"),
        (dict(z=torch.randint(0, 3, (8, 4))), TypeError, "z must have a floating dtype"),
        (dict(target_samples=torch.ones(8, 4, dtype=torch.int64)), TypeError, "target_samples must have a floating"),
        (dict(z=Z.numpy()), TypeError, "z must be a torch.Tensor"),
        (dict(target_samples=T.to("meta")), ValueError, "same device"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(generator="seed"), TypeError, "generator must be a torch.Generator"),
        (
            dict(z=Z.to("meta"), target_samples=T.to("meta"), generator=torch.Generator()),
            ValueError,
            "generator lives on",
        ),
    ],
)
def test_rdmreg_loss_bad_input(kwargs, error, match):
    args = dict(z=Z, target_samples=T)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        lpjepa.rdmreg_loss(**args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_single_row_gives_the_seeds_value(backend):
    # One row is its own sorted order: the seed (and the official code) return the mean
    # squared difference of the projected pair, and so does rdmreg_loss.
    gen = torch.Generator().manual_seed(2)
    z, target = torch.randn(1, 6, generator=gen), torch.rand(1, 6, generator=gen)
    projections = lpjepa.reference.random_projections(16, 6, generator=gen)
    leaf = z.clone().requires_grad_()
    ours = lpjepa.rdmreg_loss(leaf, target, projections=projections, backend=backend)
    grad, = torch.autograd.grad(ours, leaf)
    ref_leaf = z.double().requires_grad_()
    ref = lpjepa.reference.rdmreg_loss(ref_leaf, target.double(), projections=projections.double())
    ref_grad, = torch.autograd.grad(ref, ref_leaf)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.double(), ((z - target).double() @ projections.double().T).square().mean())
    # Drawn directions too; the SVD schemes need two rows to centre and say so.
    assert torch.isfinite(lpjepa.rdmreg_loss(z, target, 8, directions="orthogonal", backend=backend))
    with pytest.raises(ValueError, match="at least 2 rows"):
        lpjepa.rdmreg_loss(z, target, 8, directions="svd", backend=backend)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(p=0.0), ValueError, "p must be a finite number > 0"),
        (dict(p=-1.0), ValueError, "p must be a finite number > 0"),
        (dict(p=float("nan")), ValueError, "p must be a finite number > 0"),
        (dict(p=float("inf")), ValueError, "p must be a finite number > 0"),
        (dict(mu=float("inf")), ValueError, "mu must be a finite number"),
        (dict(mu=float("nan")), ValueError, "mu must be a finite number"),
        (dict(sigma=0.0), ValueError, "sigma must be > 0"),
        (dict(sigma=-1.0), ValueError, "sigma must be > 0"),
        (dict(dtype=torch.int32), TypeError, "dtype must be a floating"),
        (dict(shape="big"), TypeError, "shape must be an int or a sequence"),
        (dict(shape=(3, -1)), ValueError, "negative sizes"),
        (dict(backend="numpy"), ValueError, "backend must be one of"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sample_rgg_bad_input(kwargs, error, match, backend):
    args = dict(shape=(4, 4), backend=backend)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        lpjepa.sample_rgg(**args)


def test_loss_family_bad_input():
    with pytest.raises(ValueError, match="directions must be one of"):
        lpjepa.RDMReg(directions="random")
    with pytest.raises(ValueError, match="directions must be one of"):
        lpjepa.rdmreg_loss(Z, T, directions="torch_svd_and_random")
    with pytest.raises(ValueError, match="target_draw must be one of"):
        lpjepa.RDMReg(target_draw="each")
    # ``targets`` is the former name of target_draw: still taken, never in conflict with it.
    assert lpjepa.RDMReg(targets="per-view").target_draw == "per-view"
    assert lpjepa.RectifiedLpJEPALoss(targets="per-view").rdmreg.target_draw == "per-view"
    with pytest.raises(ValueError, match="target_draw and targets name the same setting"):
        lpjepa.RDMReg(target_draw="shared", targets="per-view")
    with pytest.raises(ValueError, match="sigma must be one of"):
        lpjepa.RDMReg(sigma="sigma_RGN")
    with pytest.raises(ValueError, match=r"target must have the shape of z \(8, 4\) \(or \(2, 8, 4\), one per view\)"):
        lpjepa.RDMReg()(Z, Z, target=torch.rand(3, 8, 4))
    with pytest.raises(ValueError, match=r"projections must have shape \(5, 4\) \(or \(2, 5, 4\), one per view\)"):
        lpjepa.RDMReg()(Z, Z, projections=torch.randn(3, 5, 4))


def test_rdmreg_module_bad_input():
    with pytest.raises(ValueError, match="p must be"):
        lpjepa.RDMReg(p=0)
    with pytest.raises(ValueError, match="num_projections must be >= 1"):
        lpjepa.RDMReg(num_projections=0)
    with pytest.raises(ValueError, match="at least one view"):
        lpjepa.RDMReg()()
    with pytest.raises(ValueError, match="every view must have shape"):
        lpjepa.RDMReg()(torch.randn(8, 4), torch.randn(8, 5))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rdmreg_views_must_be_2d_rows_before_anything_is_drawn(backend):
    # Both checked before the draw, which needs a (B, D) shape: a 1-D view once reached it as an IndexError.
    with pytest.raises(ValueError, match=r"views\[0\] must be 2-D \(batch, dim\); got shape \(8,\)"):
        lpjepa.RDMReg(backend=backend)(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match=r"views\[1\] must be 2-D"):
        lpjepa.RDMReg(backend=backend)([torch.randn(8, 4), torch.randn(8, 4, 1)])
    with pytest.raises(ValueError, match="the views need at least 1 row; got an empty batch"):
        lpjepa.RDMReg(backend=backend)(torch.randn(0, 4), torch.randn(0, 4))
