"""Argument checks of the public API, the one place each input is validated: every error names
the argument and the fix. The ops and kernels below trust what passed here."""
import math
import numbers

import torch


def check_p(p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"p must be a finite number > 0 (p=1 Laplace, p=2 Gaussian); got p={p!r}")
    return float(p)


def check_finite(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {name}={value!r}")
    return float(value)


# The scale conventions a sigma may name (``lpjepa.rgg.resolve_sigma``): unit variance of
# the Generalized Gaussian before the ReLU (the seed's), or of the rectified samples after it.
SIGMA_CONVENTIONS = ("gn", "unit-rectified")


def check_sigma(sigma):
    """None (the seed's 'gn'), one of ``SIGMA_CONVENTIONS``, or a finite number > 0 (returned as a float)."""
    if sigma is None:
        return None
    if isinstance(sigma, str):
        if sigma not in SIGMA_CONVENTIONS:
            raise ValueError(
                f"sigma must be one of {SIGMA_CONVENTIONS}, a number > 0, or None (the seed's 'gn'); got sigma={sigma!r}"
            )
        return sigma
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(
            f"sigma must be > 0, one of {SIGMA_CONVENTIONS}, or None for the seed's unit-variance scale; "
            f"got sigma={sigma!r}"
        )
    return float(sigma)


def check_num_projections(num_projections):
    if isinstance(num_projections, bool) or not isinstance(num_projections, numbers.Integral):
        raise TypeError(f"num_projections must be an int; got {type(num_projections).__name__}")
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1 (the seed uses 256); got num_projections={num_projections}")
    return int(num_projections)


def check_shape(shape):
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise TypeError(f"shape must be an int or a sequence of ints, e.g. (256, 512); got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must not have negative sizes; got shape={shape}")
    return shape


def check_float_tensor(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must have a floating dtype (float32, float16, bfloat16 or float64); got {tensor.dtype}. "
            f"Convert it with {name}.float()."
        )


def _check_shape_per_view(name, tensor, expected, num_views, what, hint=""):
    """``tensor`` must have shape ``expected``, or (num_views, *expected) when ``num_views`` allows one per view.

    The error reads "NAME must have WHAT SHAPE[ or (V, ...) one per view]; got ...HINT".
    """
    expected = tuple(expected)
    per_view = (num_views, *expected) if num_views else None
    if tuple(tensor.shape) not in (expected, per_view):
        allowed = f"{expected}" + (f" (or {per_view}, one per view)" if per_view else "")
        raise ValueError(f"{name} must have {what}{allowed}; got {tuple(tensor.shape)}{hint}")


def check_loss_inputs(z, target, projections=None, *, target_name="target_samples", global_rows=None, num_views=None):
    """Validate the sliced-Wasserstein inputs: z (b, D), target (b, D), projections (K, D).

    Under torch.distributed (``global_rows`` given) z holds this process's rows and the
    target the whole global batch, (global_rows, D), the same on every rank; neither the
    target nor the projections may then require grad, and the global batch needs 2 rows.
    One process needs 1 row (one row is its own sorted order). ``num_views``: the target
    may also be one per view, (num_views, rows, D), and the projections (num_views, K, D).
    """
    check_float_tensor("z", z)
    check_float_tensor(target_name, target)
    if z.dim() != 2:
        raise ValueError(
            f"z must be 2-D (batch, dim); got shape {tuple(z.shape)}. Flatten the features first, e.g. z.flatten(1)."
        )
    if global_rows is None:
        _check_shape_per_view(
            target_name, target, z.shape, num_views, "the shape of z ", ". Draw them with sample_rgg(z.shape, ...)."
        )
    else:
        _check_shape_per_view(
            f"under torch.distributed, {target_name}", target, (global_rows, z.shape[1]), num_views, "shape ",
            ", the same on every rank (the global batch is the sum of the local batches)",
        )
    if target.device != z.device:
        raise ValueError(
            f"z and {target_name} must be on the same device; got z on {z.device} and {target_name} on "
            f"{target.device}. Move one with .to(z.device)."
        )
    if global_rows is None and z.shape[0] < 1:
        raise ValueError("z needs at least 1 row; got an empty batch")
    if global_rows is not None and global_rows < 2:
        raise ValueError(f"the global batch (all ranks together) needs at least 2 rows to sort along; got {global_rows}")
    if projections is not None:
        check_float_tensor("projections", projections)
        if projections.dim() < 2 or projections.shape[-2] < 1:
            raise ValueError(f"projections must have shape (num_projections, {z.shape[1]}); got {tuple(projections.shape)}")
        _check_shape_per_view(
            "projections", projections, (projections.shape[-2], z.shape[1]), num_views, "shape ", " (z's dim)"
        )
        if projections.device != z.device:
            raise ValueError(
                f"projections must be on z's device {z.device}; got {projections.device}. Move them with .to(z.device)."
            )
    if global_rows is not None:
        for name, tensor in ((target_name, target), ("projections", projections)):
            if tensor is not None and tensor.requires_grad:
                raise ValueError(
                    f"{name} cannot require grad under torch.distributed (every rank holds the whole {name}); "
                    "pass it detached, or use process_group=None"
                )


def _holds_views(value):
    """Whether ``value`` is several views in one argument: a list or tuple, or a (V, N, D) stack."""
    return isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() == 3)


def _describe_views(value):
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__} of {len(value)}"


def unpack_views(views, caller="rdmreg"):
    """The views of a call, as a tuple of (N, D) tensors (not yet validated).

    ``views``: the positional arguments, either the views unpacked, ``caller(z1, z2)``, or one list /
    tuple of them or one (V, N, D) stack (Lightly's collate gives a list, its JEPA losses take stacks),
    ``caller([z1, z2])``. A stack is unbound along its first dimension, so the gradient reaches it.
    """
    if len(views) == 1 and _holds_views(views[0]):
        only = views[0]
        return tuple(only.unbind(0)) if isinstance(only, torch.Tensor) else tuple(only)
    if len(views) == 1 and isinstance(views[0], torch.Tensor) and views[0].dim() != 2:
        raise ValueError(
            f"{caller} takes (N, D) views or one (V, N, D) stack of them; got a tensor of shape "
            f"{tuple(views[0].shape)}. Flatten the features first, e.g. z.flatten(1)."
        )
    for i, view in enumerate(views):
        if _holds_views(view):
            raise ValueError(
                f"{caller} takes the views either unpacked, {caller}(z1, z2), or as one list or (V, N, D) stack, "
                f"{caller}([z1, z2]); views[{i}] is {_describe_views(view)} beside other arguments"
            )
    return tuple(views)


def two_views(first, second, names=("z_a", "z_b")):
    """The objective's two (N, D) views, from ``(first, second)`` or from ``first`` alone holding both.

    ``first`` alone may be a list or tuple of two views or a (2, N, D) stack (``second`` None).
    """
    a, b = names
    if second is None:
        if not _holds_views(first):
            raise ValueError(
                f"{b} is missing: pass two (N, D) views, ({a}, {b}), or {a} alone as a list of 2 views or a "
                f"(2, N, D) stack"
            )
        views = tuple(first.unbind(0)) if isinstance(first, torch.Tensor) else tuple(first)
        if len(views) != 2:
            raise ValueError(
                f"the objective compares two views; {a} holds {len(views)} ({_describe_views(first)}). "
                f"Pass 2, e.g. {a}[:2], or use RDMReg for the regularizer of any number of views."
            )
        return views
    for name, value in ((a, first), (b, second)):
        if _holds_views(value):
            raise ValueError(
                f"{name} must be one (N, D) view when {b} is given; got {_describe_views(value)}. "
                f"Pass ({a}, {b}), or {a} alone as a list of 2 views or a (2, N, D) stack."
            )
    return first, second


def check_views(views):
    """RDMReg's views: at least one, 2-D floating tensors of one shape."""
    if not views:
        raise ValueError("RDMReg needs at least one view: call it as rdmreg(z1) or rdmreg(z1, z2)")
    for i, view in enumerate(views):
        check_float_tensor(f"views[{i}]", view)
        if view.dim() != 2:
            raise ValueError(
                f"views[{i}] must be 2-D (batch, dim); got shape {tuple(view.shape)}. Flatten the features first, "
                f"e.g. z.flatten(1)."
            )
        if view.shape != views[0].shape:
            raise ValueError(f"every view must have shape {tuple(views[0].shape)}; views[{i}] has {tuple(view.shape)}")


def rdmreg_views(views):
    """The views of an ``RDMReg`` call, unpacked (``unpack_views``) and checked (``check_views``).

    The usual call, (N, D) floating tensors of one shape passed one by one, is recognised in
    one pass and returned as given; anything else takes the two functions, and their errors.
    """
    if views and isinstance(views[0], torch.Tensor):
        shape = views[0].shape
        for view in views:
            if not (isinstance(view, torch.Tensor) and view.dim() == 2 and view.shape == shape
                    and view.is_floating_point()):
                break
        else:
            return views
    views = unpack_views(views, "RDMReg")
    check_views(views)
    return views


def check_generator(generator, device):
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if generator.device.type != torch.device(device).type:
        raise ValueError(
            f"generator lives on {generator.device} but the numbers are drawn on {torch.device(device)}; "
            f"create it with torch.Generator(device={str(torch.device(device))!r})."
        )


# ``directions=``: how the sliced-Wasserstein directions are drawn (``lpjepa.ops.directions``).
DIRECTION_SCHEMES = ("gaussian", "orthogonal", "svd", "svd-bottom-half")
# ``target_draw=``: one target batch for all views (the seed's) or a fresh one per view (the official code's).
TARGET_DRAWS = ("shared", "per-view")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {name}={value!r}")
    return value


def check_svd_rows(directions, rows):
    """The SVD schemes centre the batch, which needs 2 rows (a centred single row is zero)."""
    if directions.startswith("svd") and rows < 2:
        raise ValueError(
            f"directions={directions!r} needs a batch of at least 2 rows (the singular vectors of a centred "
            f"single row are arbitrary); got {rows}. Use directions='gaussian'."
        )


def check_flag(name, value):
    """A switch must be a bool: a string such as 'false' would otherwise read as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {name}={value!r}")
    return value


def check_alias(name, value, alias, alias_value, default):
    """One setting given under two names (e.g. num_projections and its alias num_slices): either, or both alike.

    None means not given; the value is ``default`` when neither is.
    """
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(
            f"{name} and {alias} name the same setting; got {name}={value!r} and {alias}={alias_value!r}. Give one of them."
        )
    for given in (value, alias_value):
        if given is not None:
            return given
    return default
