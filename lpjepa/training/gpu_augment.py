"""The view augmentation of ``data.train_transform``, applied to a whole batch of uint8 image tensors at once.

Per view the same random choices as torchvision's transforms (``RECIPES`` holds the
numbers): RandomResizedCrop (scale, ratio and position, bilinear or bicubic with antialiasing),
horizontal flip, ColorJitter (brightness, contrast, saturation and hue factors and the
random order of the four), RandomGrayscale, RandomSolarize, then Normalize. Each op
computes what torchvision's functional op computes on a float image in [0, 1]
(``torchvision.transforms.functional`` on tensors); the PIL pipeline rounds to uint8
after each op, this one keeps every step in floating point.

Two halves:

- ``draw_view_params`` draws the parameters of every view on the host, with numpy, from
  a generator the caller seeds (``device_data`` seeds it from (seed, epoch, step)). They
  are a few numbers per view; drawing them on the host keeps the device free of random
  state and lets the host know, without asking the device, which views take the hue op
  at which position of the jitter order.
- ``BatchAugment`` applies them to a batch on the images' device in a few tensor ops:
  the crop, resize and flip as two small matmuls per view (``resize_weights``), each
  jitter position as one blend for every view plus the hue rotation on the views that
  have it there (the batch is ordered by that position on the host, so each is one
  slice), grayscale, solarize and the normalisation, in float32.
"""
from typing import NamedTuple

import numpy as np
import torch

from .data import RECIPES, normalization

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma, as PIL's "L" conversion).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# RandomResizedCrop's tries of a random scale and ratio before its central-crop fallback.
CROP_ATTEMPTS = 10
# ColorJitter's op numbering (its fn_idx): brightness, contrast, saturation, hue.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
JITTER_OPS = 4
# Where red, green and blue sit on the hue circle of _hsv2rgb's closed form, in sixths of a
# turn: 5, 3, 1, as arange's (start, end, step).
HUE_CHANNEL_OFFSETS = (5.0, 0.0, -2.0)
# Largest value of a uint8 image: images are divided by it on the way to [0, 1].
UINT8_MAX = 255.0
# Columns of the per-view parameter table sent to the device (see ``_param_table``).
CROP_COLUMNS = slice(0, 4)  # top, left, height, width
FLIP_COLUMN = 4
BLEND_COLUMNS = slice(5, 17)  # per jitter position: blend factor, gray weight, mean-gray weight
HUE_COLUMN, GRAYSCALE_COLUMN, SOLARIZE_COLUMN = 17, 18, 19
PARAM_COLUMNS = 20


def jitter_ranges(jitter):
    """ColorJitter's (min, max) factor ranges from its four strengths, as torchvision's ``_check_input`` forms them.

    Brightness, contrast and saturation ``s`` give ``(max(0, 1 - s), 1 + s)``, hue ``h``
    gives ``(-h, h)``; a strength of 0 gives None (the op is left out).
    """
    brightness, contrast, saturation, hue = (float(v) for v in jitter)
    ranges = [(max(0.0, 1.0 - s), 1.0 + s) if s else None for s in (brightness, contrast, saturation)]
    return ranges + [(-hue, hue) if hue else None]


class ViewParams(NamedTuple):
    """The random choices of ``n`` views, numpy arrays with one row per view.

    ``top``, ``left``, ``height``, ``width``: the crop (int64, pixels of the source image);
    ``flip``: horizontal flip (bool); ``factors``: (n, 4) float64 brightness, contrast,
    saturation and hue factors, neutral (1, 1, 1, 0) where the jitter is not applied or
    its op is left out; ``order``: (n, 4) int64, the jitter's order (a permutation of
    ``BRIGHTNESS``..``HUE``); ``grayscale``, ``solarize``: bool.
    """

    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    flip: np.ndarray
    factors: np.ndarray
    order: np.ndarray
    grayscale: np.ndarray
    solarize: np.ndarray


def draw_crops(rng, n, height, width, scale, ratio):
    """(top, left, crop height, crop width) of ``n`` RandomResizedCrops, int64 arrays.

    ``RandomResizedCrop.get_params`` for every view at once: up to ``CROP_ATTEMPTS``
    tries of an area fraction uniform in ``scale`` and a log-uniform aspect ratio in
    ``ratio``, the first that fits is kept, else torchvision's central-crop fallback;
    the position is uniform over the places the crop fits.
    """
    area = height * width
    log_ratio = np.log(ratio)
    target_area = area * rng.uniform(scale[0], scale[1], size=(n, CROP_ATTEMPTS))
    aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1], size=(n, CROP_ATTEMPTS)))
    # np.round rounds half to even, as Python's round in get_params.
    w = np.round(np.sqrt(target_area * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    h, w = h[rows, first], w[rows, first]
    fallback_h, fallback_w = _central_crop(height, width, ratio)
    found = fits.any(axis=1)
    h, w = np.where(found, h, fallback_h), np.where(found, w, fallback_w)
    top = rng.integers(0, height - h + 1)
    left = rng.integers(0, width - w + 1)
    top, left = np.where(found, top, (height - h) // 2), np.where(found, left, (width - w) // 2)
    return top, left, h, w


def _central_crop(height, width, ratio):
    """The (h, w) RandomResizedCrop falls back to when no try fits: the whole image, trimmed to the ratio range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def draw_jitter(rng, n, jitter, jitter_p):
    """(factors (n, 4), order (n, 4)) of ColorJitter applied with probability ``jitter_p``; see ``ViewParams``."""
    ranges = jitter_ranges(jitter)
    order = rng.permuted(np.tile(np.arange(JITTER_OPS), (n, 1)), axis=1)
    applied = rng.random(n) < jitter_p
    factors = np.empty((n, JITTER_OPS))
    for op, bounds in enumerate(ranges):
        neutral = 0.0 if op == HUE else 1.0
        drawn = rng.uniform(bounds[0], bounds[1], size=n) if bounds is not None else np.full(n, neutral)
        factors[:, op] = np.where(applied, drawn, neutral)
    return factors, order


def draw_view_params(recipe, n, height, width, rng):
    """The ``ViewParams`` of ``n`` views of ``height`` x ``width`` images under ``recipe`` (an entry of ``RECIPES``).

    ``rng``: a ``numpy.random.Generator``; the same generator state gives the same views.
    """
    top, left, h, w = draw_crops(rng, n, height, width, recipe["scale"], recipe["ratio"])
    factors, order = draw_jitter(rng, n, recipe["jitter"], recipe["jitter_p"])
    grayscale = rng.random(n) < recipe["grayscale_p"]
    solarize = rng.random(n) < recipe["solarize_p"]
    flip = rng.random(n) < recipe["flip_p"]
    return ViewParams(top, left, h, w, flip, factors, order, grayscale, solarize)


def blend_table(params):
    """(n, 4, 3) float64: per view and jitter position, the blend ``(factor, gray weight, mean-gray weight)``.

    Brightness, contrast and saturation are each ``factor * x + (1 - factor) * target``
    with the target 0, the image's mean gray, or its per-pixel gray; a position that
    holds the hue op is the identity blend (factor 1).
    """
    n = params.order.shape[0]
    table = np.zeros((n, JITTER_OPS, 3))
    table[:, :, 0] = 1.0
    rows = np.arange(n)
    for position in range(JITTER_OPS):
        op = params.order[:, position]
        blended = op != HUE
        table[:, position, 0] = np.where(blended, params.factors[rows, np.minimum(op, SATURATION)], 1.0)
        table[:, position, 1] = op == SATURATION
        table[:, position, 2] = op == CONTRAST
    return table


def hue_positions(params):
    """(n,) int64: the jitter position of each view's hue op, ``JITTER_OPS`` where its hue factor is 0."""
    position = np.argmax(params.order == HUE, axis=1)
    return np.where(params.factors[:, HUE] != 0.0, position, JITTER_OPS)


def _param_table(params, order):
    """(n, PARAM_COLUMNS) float32 table of the views in ``order``, the layout of the ``*_COLUMN(S)`` constants."""
    n = params.order.shape[0]
    table = np.empty((n, PARAM_COLUMNS), dtype=np.float32)
    table[:, CROP_COLUMNS] = np.stack([params.top, params.left, params.height, params.width], axis=1)
    table[:, FLIP_COLUMN] = params.flip
    table[:, BLEND_COLUMNS] = blend_table(params).reshape(n, -1)
    table[:, HUE_COLUMN] = params.factors[:, HUE]
    table[:, GRAYSCALE_COLUMN] = params.grayscale
    table[:, SOLARIZE_COLUMN] = params.solarize
    return table[order]


def to_device(array, device):
    """A numpy array on ``device`` without making the host wait: pinned memory and an asynchronous copy on CUDA."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------- the ops on batches


# The bicubic filter's parameter: PIL's (and torch's antialiased bicubic's) Keys cubic, a = -0.5.
CUBIC_A = -0.5


def _triangle(distance):
    return (1.0 - distance.abs()).clamp_(min=0.0)


def _cubic(distance):
    """Keys' cubic convolution kernel with ``CUBIC_A``: 0 from |x| = 2 on."""
    x, a = distance.abs(), CUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


# The resize filters: the kernel of a distance in input pixels (widened by the scale when shrinking).
FILTERS = {"bilinear": _triangle, "bicubic": _cubic}


def resize_weights(start, length, in_size, out_size, dtype=torch.float32, interpolation="bilinear"):
    """(n, out_size, in_size) matrices: row o is output pixel o of an antialiased resize of ``[start, start + length)``.

    ``start``, ``length``: (n,) tensors, each view's crop along one axis (pixels).
    ``interpolation``: 'bilinear' or 'bicubic'. The weights are those of torch's
    ``interpolate(mode=..., antialias=True)``, which torchvision's resize and PIL use: a
    triangle (bilinear) or Keys cubic with a = -0.5 (bicubic) filter widened by the scale
    when shrinking, over the crop's pixels only, normalised to sum to 1.
    """
    start, length = start.to(dtype), length.to(dtype)
    scale = length / out_size
    support = scale.clamp(min=1.0)
    center = start[:, None] + scale[:, None] * (torch.arange(out_size, device=start.device, dtype=dtype) + 0.5)
    pixel = torch.arange(in_size, device=start.device, dtype=dtype)
    distance = (pixel + 0.5 - center[:, :, None]) / support[:, None, None]
    weights = FILTERS[interpolation](distance)
    inside = (pixel >= start[:, None]) & (pixel < (start + length)[:, None])
    weights = weights * inside[:, None, :]
    return weights / weights.sum(dim=2, keepdim=True)


def resized_crop(images, top, left, height, width, size, flip=None, value_scale=1.0, interpolation="bilinear"):
    """Crop each image to (top, left, height, width), resize it to ``size`` x ``size`` (antialiased), flip it.

    ``images``: (n, C, H, W) float; the crop arguments (n,) tensors; ``flip``: (n,) bool
    or None; ``value_scale``: a factor on every value (1 / 255 takes uint8 values to [0, 1]);
    ``interpolation``: 'bilinear' or 'bicubic' (whose overshoot is left unclamped here).
    Returns (n, C, size, size) in the images' dtype. Each view is
    ``rows @ image @ columns^T``, with the flip folded into the column weights and the
    value scale into the row weights.
    """
    dtype, n = images.dtype, images.shape[0]
    if images.shape[-2] == images.shape[-1]:  # both axes in one call: half the ops
        both = resize_weights(torch.cat([top, left]), torch.cat([height, width]), images.shape[-1], size, dtype,
                              interpolation)
        rows, columns = both[:n] * value_scale, both[n:]
    else:
        rows = resize_weights(top, height, images.shape[-2], size, dtype, interpolation) * value_scale
        columns = resize_weights(left, width, images.shape[-1], size, dtype, interpolation)
    if flip is not None:
        columns = torch.where(flip[:, None, None], columns.flip(1), columns)
    return rows[:, None] @ images @ columns[:, None].transpose(-1, -2)


def grayscale(images):
    """(n, 1, H, W): torchvision's ``rgb_to_grayscale`` of (n, 3, H, W) images."""
    r, g, b = images.unbind(dim=1)
    gray = (GRAY_WEIGHTS[0] * r).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])
    return gray.unsqueeze(1)


def _per_view(values, images):
    """(n,) values shaped to broadcast over (n, C, H, W) images, in their dtype."""
    return values.to(images.dtype).view(-1, 1, 1, 1)


def blend(images, factor, gray_weight, mean_weight):
    """``clamp(factor * x + (1 - factor) * target, 0, 1)`` per view, target ``gray_weight * gray + mean_weight * mean gray``.

    With (gray, mean) weights (0, 0) it is torchvision's ``adjust_brightness``, (0, 1)
    ``adjust_contrast``, (1, 0) ``adjust_saturation``; factor 1 leaves the view as it is.
    All arguments but ``images`` are (n,) tensors.
    """
    gray = grayscale(images)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    target = torch.addcmul(_per_view(mean_weight, images) * mean, _per_view(gray_weight, images), gray)
    # lerp is target + factor * (x - target), or x - (x - target) * (1 - factor) for factor >= 0.5: exactly x at factor 1.
    return torch.lerp(target.expand_as(images), images, _per_view(factor, images)).clamp_(0.0, 1.0)


def adjust_hue(images, shift):
    """torchvision's ``adjust_hue`` of (n, 3, H, W) images in [0, 1], a hue shift (n,) in [-0.5, 0.5] per view.

    RGB to hue as torchvision's ``_rgb2hsv``, in sixths of a turn; back with the closed
    form of ``_hsv2rgb``: channel c is ``max - (max - min) * clamp(min(k, 4 - k), 0, 1)``
    with ``k = (n_c + hue) mod 6`` and n = 5, 3, 1 for red, green, blue. Computed in
    float32 at least, as torchvision does.
    """
    out_dtype = images.dtype
    x = images if images.dtype == torch.float64 else images.float()
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    chroma = maxc - minc
    # torchvision's sector rule: red if it is the max, else green, else blue; the hue is
    # sector start + (next - previous channel) / chroma, and 0 where chroma is 0.
    is_r = maxc[:, 0] == r
    is_g = (maxc[:, 0] == g) & ~is_r
    difference = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g)).unsqueeze(1)
    # Sector starts 0, 2, 4 as arithmetic on the masks: torch.where with Python scalars is many times slower on the CPU.
    start = (4.0 - 2.0 * (is_r | is_g).to(x.dtype) - 2.0 * is_r.to(x.dtype)).unsqueeze(1)
    sixths = difference.div_(chroma + (chroma == 0).to(x.dtype)).add_(start)
    shifted = sixths.add_(6.0 * shift.to(x.dtype).view(-1, 1, 1, 1))
    # Made on the device (a tensor from a list would be a copy from the host).
    offsets = torch.arange(*HUE_CHANNEL_OFFSETS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(shifted + offsets, 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(maxc, chroma, weight, value=-1.0).to(out_dtype)


def solarize(images, selected, threshold):
    """torchvision's ``solarize`` (values >= threshold become 1 - value) on the views where ``selected`` (n,) is true."""
    chosen = selected.view(-1, 1, 1, 1) & (images >= threshold)
    return torch.where(chosen, 1.0 - images, images)


class BatchAugment:
    """The views of one recipe for images held on a device as uint8.

    ``BatchAugment(augmentation, image_size, dataset)``; ``views(source, index, params)``
    returns the (n, 3, image_size, image_size) normalised float32 views of
    ``source[index]`` (source: (N, 3, H, W) uint8 on any device; index: (n,) int64
    numpy) under ``params`` (``ViewParams`` of n views).
    """

    def __init__(self, augmentation="seed", image_size=32, dataset="cifar100", dtype=torch.float32):
        self.recipe = RECIPES[augmentation]
        self.size = image_size
        self.mean, self.std = normalization(augmentation, dataset)
        self.dtype = dtype
        self.solarize_threshold = self.recipe["solarize_threshold"] / UINT8_MAX
        self._normalization = {}

    def draw(self, n, height, width, rng):
        return draw_view_params(self.recipe, n, height, width, rng)

    def views(self, source, index, params):
        device = source.device
        positions = hue_positions(params)
        # Views grouped by the position of their hue op, so that each position's hue is one slice.
        order = np.argsort(positions, kind="stable")
        bounds = np.searchsorted(positions[order], np.arange(JITTER_OPS + 1)).tolist()
        table = to_device(_param_table(params, order), device)
        indices = to_device(np.stack([index[order], np.argsort(order)]).astype(np.int64), device)
        x = source.index_select(0, indices[0]).to(self.dtype)
        crop = table[:, CROP_COLUMNS].T
        x = resized_crop(x, *crop, self.size, flip=table[:, FLIP_COLUMN] > 0, value_scale=1.0 / UINT8_MAX,
                         interpolation=self.recipe["interpolation"])
        if self.recipe["interpolation"] == "bicubic":
            x = x.clamp_(0.0, 1.0)  # the PIL path's crop is a uint8 image: the cubic's overshoot is clipped there
        blends = table[:, BLEND_COLUMNS].view(-1, JITTER_OPS, 3)
        for position in range(JITTER_OPS):
            x = blend(x, *blends[:, position].T)
            lo, hi = bounds[position], bounds[position + 1]
            if hi > lo:
                x[lo:hi] = adjust_hue(x[lo:hi], table[lo:hi, HUE_COLUMN])
        if self.recipe["grayscale_p"] > 0:
            x = torch.where(_per_view(table[:, GRAYSCALE_COLUMN], x) > 0, grayscale(x), x)
        if self.recipe["solarize_p"] > 0:
            x = solarize(x, table[:, SOLARIZE_COLUMN] > 0, self.solarize_threshold)
        x = self.normalize(x)
        return x.index_select(0, indices[1])

    def normalize(self, x):
        """Normalize's ``(x - mean) / std`` per channel, as one ``x * (1 / std) - mean / std``."""
        key = (x.device, x.dtype)
        if key not in self._normalization:
            # Made once per device: a tensor built from a list on CUDA is a synchronous copy.
            mean, std = (torch.tensor(v, dtype=torch.float64) for v in (self.mean, self.std))
            self._normalization[key] = tuple(t.to(x.dtype).view(1, -1, 1, 1).to(x.device) for t in (-mean / std, 1 / std))
        shift, scale = self._normalization[key]
        return torch.addcmul(shift, x, scale)


def view_seed(seed, *counters):
    """A numpy ``SeedSequence`` entropy list from a run's seed (any int) and non-negative counters."""
    return [int(seed) % 2**64, *(int(c) for c in counters)]

