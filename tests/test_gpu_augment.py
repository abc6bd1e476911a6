"""The batched augmentation (lpjepa.training.gpu_augment) against torchvision, on CPU tensors.

Two kinds of checks: the parameters drawn per view follow the distributions of
torchvision's own draws (``RandomResizedCrop.get_params``, ``ColorJitter.get_params``,
the transforms' probabilities), by two-sample KS / chi-square / binomial tests on many
draws, each beside a negative control the same test must reject; and, for fixed
parameters, every op and the whole pipeline match torchvision's functional ops on
tensors within the float32 tolerance of tests/conftest.py (float64 tolerance where
torchvision computes in the input's dtype).
"""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from conftest import tolerance
from PIL import Image
from scipy import stats

from lpjepa.training import gpu_augment as G
from lpjepa.training.data import INTERPOLATIONS, NORMALIZATION, RECIPES, normalization, train_transform

DRAWS = 4000
# A distribution test passes above this p-value; its negative control must fall below REJECT.
ACCEPT, REJECT = 1e-3, 1e-6


def torchvision_crops(n, height, width, scale, ratio):
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    return np.array([T.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)]).T


def our_crops(n, height, width, scale, ratio, seed=1):
    return np.stack(G.draw_crops(np.random.default_rng(seed), n, height, width, scale, ratio))


# (image height, width, scale, ratio): the recipes' crop on CIFAR, a non-square image, and
# a range that mostly fails its 10 tries and takes torchvision's central-crop fallback.
CROP_CASES = [(32, 32, (0.08, 1.0), (3 / 4, 4 / 3)), (24, 40, (0.08, 1.0), (3 / 4, 4 / 3)), (32, 32, (0.9, 1.0), (2.0, 3.0))]


@pytest.mark.parametrize("height, width, scale, ratio", CROP_CASES)
def test_crop_parameters_follow_torchvision(height, width, scale, ratio):
    theirs = torchvision_crops(DRAWS, height, width, scale, ratio)
    ours = our_crops(DRAWS, height, width, scale, ratio)
    for name, a, b in zip(("top", "left", "height", "width"), ours, theirs):
        assert stats.ks_2samp(a, b).pvalue > ACCEPT, name
    assert (ours[0] + ours[2] <= height).all() and (ours[1] + ours[3] <= width).all() and (ours[2:] > 0).all()


def test_crop_distribution_test_rejects_another_scale():
    theirs = torchvision_crops(DRAWS, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3))
    ours = our_crops(DRAWS, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3))
    assert stats.ks_2samp(ours[2] * ours[3], theirs[2] * theirs[3]).pvalue < REJECT


@pytest.mark.parametrize("augmentation", ["seed", "paper"])
def test_jitter_ranges_are_torchvision_colorjitter(augmentation):
    jitter = T.ColorJitter(*RECIPES[augmentation]["jitter"])
    expected = [getattr(jitter, k) for k in ("brightness", "contrast", "saturation", "hue")]
    assert G.jitter_ranges(RECIPES[augmentation]["jitter"]) == [tuple(r) for r in expected]


def test_jitter_factors_and_order_follow_torchvision():
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    torch.manual_seed(0)
    draws = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) for _ in range(DRAWS)]
    their_order = np.array([d[0].tolist() for d in draws])
    their_factors = np.array([d[1:] for d in draws])
    factors, order = G.draw_jitter(np.random.default_rng(2), DRAWS, (0.4, 0.4, 0.4, 0.1), 1.0)
    for op in range(G.JITTER_OPS):
        assert stats.ks_2samp(factors[:, op], their_factors[:, op]).pvalue > ACCEPT, op
    # The order: each of the 24 permutations as often as torchvision's randperm gives it.
    ours_codes, their_codes = (o @ 4 ** np.arange(4) for o in (order, their_order))
    assert np.array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (DRAWS, 1)))
    assert _same_categories(ours_codes, their_codes) > ACCEPT
    # Negative controls: a narrower brightness range, an order that is always the same.
    narrow, _ = G.draw_jitter(np.random.default_rng(3), DRAWS, (0.3, 0.4, 0.4, 0.1), 1.0)
    assert stats.ks_2samp(narrow[:, 0], their_factors[:, 0]).pvalue < REJECT
    assert _same_categories(np.zeros(DRAWS, dtype=int), their_codes) < REJECT


def _same_categories(a, b):
    """p-value of a chi-square test that two samples of categories come from one distribution."""
    categories = np.union1d(a, b)
    table = np.array([[np.sum(x == c) for c in categories] for x in (a, b)])
    return stats.chi2_contingency(table).pvalue


@pytest.mark.parametrize("augmentation", ["seed", "paper"])
def test_probabilities_of_flip_jitter_grayscale_solarize(augmentation):
    recipe = RECIPES[augmentation]
    params = G.draw_view_params(recipe, DRAWS, 32, 32, np.random.default_rng(4))
    jittered = (params.factors != np.array([1.0, 1.0, 1.0, 0.0])).any(axis=1)
    for name, drawn, p in (("flip", params.flip, recipe["flip_p"]), ("jitter", jittered, recipe["jitter_p"]),
                           ("grayscale", params.grayscale, recipe["grayscale_p"]),
                           ("solarize", params.solarize, recipe["solarize_p"])):
        if p in (0.0, 1.0):
            assert drawn.mean() == p, name
        else:
            assert stats.binomtest(int(drawn.sum()), DRAWS, p).pvalue > ACCEPT, name
            assert stats.binomtest(int(drawn.sum()), DRAWS, p + 0.05).pvalue < REJECT, name


def test_train_transform_carries_the_recipe_numbers():
    """The PIL pipeline is built from the same RECIPES the batched one reads."""
    ops = train_transform("paper").transforms
    crop, apply_jitter, gray, solar, flip = ops[:5]
    recipe = RECIPES["paper"]
    assert (tuple(crop.scale), tuple(crop.ratio)) == (recipe["scale"], recipe["ratio"])
    assert apply_jitter.p == recipe["jitter_p"] and apply_jitter.transforms[0].saturation == (0.8, 1.2)
    assert (gray.p, solar.p, solar.threshold, flip.p) == (0.2, 0.1, 128, 0.5)
    seed_ops = train_transform("seed").transforms
    assert isinstance(seed_ops[2], T.ColorJitter) and tuple(seed_ops[0].scale) == RECIPES["seed"]["scale"]


# ----------------------------------------------------------------------------- the ops, for fixed parameters


def images(n, height=32, width=32, dtype=torch.float32, seed=0):
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("height, width, size", [(32, 32, 32), (32, 32, 16), (32, 32, 17), (24, 40, 32), (32, 32, 48)])
def test_resized_crop_and_flip_match_torchvision(height, width, size, dtype, interpolation):
    n = 9
    x = images(n, height, width, dtype)
    rng = np.random.default_rng(5)
    top, left, h, w = G.draw_crops(rng, n, height, width, (0.08, 1.0), (3 / 4, 4 / 3))
    flip = np.arange(n) % 2 == 1
    ours = G.resized_crop(x, *(torch.from_numpy(a) for a in (top, left, h, w)), size, torch.from_numpy(flip),
                          interpolation=interpolation)
    expected = []
    for i in range(n):
        view = F.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [size, size],
                              INTERPOLATIONS[interpolation], antialias=True)
        expected.append(F.hflip(view) if flip[i] else view)
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(ours, torch.stack(expected), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blends_match_brightness_contrast_saturation(dtype):
    n = 7
    x = images(n, dtype=dtype)
    factor = torch.linspace(0.0, 2.0, n, dtype=torch.float64)
    zeros, ones = torch.zeros(n), torch.ones(n)
    atol, rtol = tolerance(dtype)
    for fn, gray, mean in ((F.adjust_brightness, zeros, zeros), (F.adjust_contrast, zeros, ones),
                           (F.adjust_saturation, ones, zeros)):
        expected = torch.stack([fn(x[i], float(factor[i])) for i in range(n)])
        torch.testing.assert_close(G.blend(x, factor, gray, mean), expected, atol=atol, rtol=rtol, msg=fn.__name__)
    assert torch.equal(G.blend(x, ones, ones, zeros), x)  # factor 1 leaves a view as it is, bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hue_matches_torchvision(dtype):
    n = 11
    x = images(n, dtype=dtype)
    x[0] = 0.5  # gray pixels: no hue
    x[1, :, :4] = x[1, 0, :4]  # partly gray
    x[2, 1] = x[2, 0]  # two channels tied for the maximum
    shift = torch.linspace(-0.5, 0.5, n, dtype=torch.float64)
    expected = torch.stack([F.adjust_hue(x[i], float(shift[i])) for i in range(n)])
    # torchvision computes the hue in float32 whatever the input, hence float32's tolerance.
    atol, rtol = tolerance(torch.float32)
    ours = G.adjust_hue(x, shift)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, expected, atol=atol, rtol=rtol)


def test_grayscale_solarize_normalize_match_torchvision():
    n = 6
    x = images(n, dtype=torch.float64)
    atol, rtol = tolerance(torch.float64)
    torch.testing.assert_close(G.grayscale(x).expand(-1, 3, -1, -1), torch.stack([F.rgb_to_grayscale(v, 3) for v in x]), atol=atol, rtol=rtol)
    selected = torch.arange(n) % 2 == 0
    expected = torch.stack([F.solarize(v, 128 / 255) if s else v for v, s in zip(x, selected)])
    torch.testing.assert_close(G.solarize(x, selected, 128 / 255), expected, atol=0, rtol=0)
    mean, std = NORMALIZATION["cifar10"]
    augment = G.BatchAugment("seed", 32, "cifar10", dtype=torch.float64)
    torch.testing.assert_close(augment.normalize(x), F.normalize(x, mean, std), atol=atol, rtol=rtol)


def torchvision_view(image, params, i, recipe, size, mean, std):
    """One view by torchvision's functional ops with the parameters ``params`` drew for view i."""
    x = F.resized_crop(image, int(params.top[i]), int(params.left[i]), int(params.height[i]), int(params.width[i]),
                       [size, size], INTERPOLATIONS[recipe["interpolation"]], antialias=True)
    if torch.is_tensor(x) and recipe["interpolation"] == "bicubic":
        x = x.clamp(0, 1)  # as PIL's uint8 result is
    if params.flip[i]:
        x = F.hflip(x)
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for op in params.order[i]:
        x = ops[op](x, float(params.factors[i, op]))
    if params.grayscale[i]:
        x = F.rgb_to_grayscale(x, 3)
    if params.solarize[i]:
        x = F.solarize(x, recipe["solarize_threshold"] / 255 if torch.is_tensor(x) else recipe["solarize_threshold"])
    if not torch.is_tensor(x):
        x = F.to_tensor(x)
    return F.normalize(x, mean, std)


@pytest.mark.parametrize("augmentation", ["seed", "paper"])
@pytest.mark.parametrize("n", [3, 255])
def test_whole_batch_matches_torchvision_view_by_view(augmentation, n):
    source = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    augment = G.BatchAugment(augmentation, 32, "cifar100")
    rng = np.random.default_rng(6)
    index = rng.integers(0, len(source), n)
    params = augment.draw(n, 32, 32, rng)
    ours = augment.views(source, index, params)
    mean, std = normalization(augmentation, "cifar100")
    expected = torch.stack([torchvision_view(source[index[i]].float() / 255, params, i, augment.recipe, 32, mean, std)
                            for i in range(n)])
    atol, rtol = tolerance(torch.float32)
    # Normalize divides by std ~0.26, so float32's absolute tolerance is scaled by 1/std.
    torch.testing.assert_close(ours, expected, atol=atol / min(std), rtol=rtol)


def test_close_to_the_pil_pipeline_on_smooth_images():
    """PIL rounds to uint8 after every op (and its hue to 256 levels); on average that is under 2.5 levels of 255."""
    low = torch.rand(32, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    smooth = torch.nn.functional.interpolate(low, size=32, mode="bicubic", align_corners=False).clamp(0, 1)
    source = (smooth * 255).round().to(torch.uint8)
    augment = G.BatchAugment("paper", 32, "cifar100")
    params = augment.draw(32, 32, 32, np.random.default_rng(7))
    ours = augment.views(source, np.arange(32), params)
    mean, std = normalization("paper", "cifar100")
    pil = torch.stack([torchvision_view(Image.fromarray(source[i].permute(1, 2, 0).numpy()), params, i, augment.recipe,
                                        32, mean, std) for i in range(32)])
    levels = ((ours - pil) * torch.tensor(std).view(1, 3, 1, 1) * 255).abs()
    assert levels.mean() < 2.5, levels.mean()


def test_same_generator_state_same_views():
    source = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    augment = G.BatchAugment("paper", 16, "cifar10")
    index = np.arange(8)

    def views(*counters):
        rng = np.random.default_rng(G.view_seed(*counters))
        return augment.views(source, index, augment.draw(8, 32, 32, rng))

    assert torch.equal(views(-1, 0, 3), views(-1, 0, 3))
    assert not torch.equal(views(-1, 0, 3), views(-1, 0, 4))
    assert views(0, 1, 2).shape == (8, 3, 16, 16)


# ----------------------------------------------------------------------------- the official recipe: device vs PIL path


class _Recorder:
    """Wraps the PIL pipeline's random choices while it runs, recording each one (restored by ``recording``)."""

    def __init__(self):
        self.crops, self.jitters, self.counts = [], [], {"grayscale": 0, "solarize": 0, "flip": 0}

    def crop_params(self, original):
        def get_params(img, scale, ratio):
            params = original(img, scale, ratio)
            self.crops.append(params)
            return params
        return staticmethod(get_params)

    def jitter_params(self, original):
        def get_params(brightness, contrast, saturation, hue):
            params = original(brightness, contrast, saturation, hue)
            self.jitters.append(params)
            return params
        return staticmethod(get_params)

    def counted(self, name, original):
        def op(*args, **kwargs):
            self.counts[name] += 1
            return original(*args, **kwargs)
        return op


def pil_path_draws(views):
    """The random choices of ``views`` views of the training PIL path under the official recipe, as it runs them.

    ``TwoViewDataset`` over ``train_transform('paper')`` on a 32x32 image: its
    RandomResizedCrop and ColorJitter parameters, and how often it grayscales, solarises
    and flips, read by wrapping torchvision's own calls while the real pipeline runs.
    """
    from unittest import mock

    from lpjepa.training.data import TwoViewDataset

    recorder = _Recorder()
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    dataset = TwoViewDataset([(image, 0)] * (views // 2), train_transform("paper", 32, "cifar100"), seed=3)
    with mock.patch.object(T.RandomResizedCrop, "get_params", recorder.crop_params(T.RandomResizedCrop.get_params)), \
            mock.patch.object(T.ColorJitter, "get_params", recorder.jitter_params(T.ColorJitter.get_params)), \
            mock.patch.object(F, "rgb_to_grayscale", recorder.counted("grayscale", F.rgb_to_grayscale)), \
            mock.patch.object(F, "solarize", recorder.counted("solarize", F.solarize)), \
            mock.patch.object(F, "hflip", recorder.counted("flip", F.hflip)):
        for index in range(len(dataset)):
            dataset[index]
    return recorder


def _same_fraction(count_a, n_a, count_b, n_b):
    """p-value of a chi-square test that two counts out of n come from one probability."""
    return stats.chi2_contingency([[count_a, n_a - count_a], [count_b, n_b - count_b]]).pvalue


def test_device_path_draws_the_pil_paths_distribution_for_the_official_recipe():
    """Crop area and aspect, jitter factors and frequency, grayscale / solarize / flip fractions: device vs PIL path."""
    views = DRAWS // 2  # the PIL path runs its whole pipeline per view: half the draws keep this test to seconds
    pil = pil_path_draws(views)
    assert len(pil.crops) == views
    device = G.BatchAugment("paper", 32, "cifar100")
    ours = device.draw(views, 32, 32, np.random.default_rng(8))
    assert device.recipe["interpolation"] == "bicubic" and device.mean == normalization("paper", "cifar100")[0]

    pil_crops = np.array(pil.crops, dtype=np.float64)  # (top, left, height, width)
    pil_area, pil_aspect = pil_crops[:, 2] * pil_crops[:, 3] / 1024, pil_crops[:, 3] / pil_crops[:, 2]
    our_area, our_aspect = ours.height * ours.width / 1024, ours.width / ours.height
    assert stats.ks_2samp(our_area, pil_area).pvalue > ACCEPT
    assert stats.ks_2samp(our_aspect, pil_aspect).pvalue > ACCEPT
    assert pil_area.min() >= 0.2 * 0.9 and our_area.min() >= 0.2 * 0.9  # scale (0.2, 1), up to rounding to pixels

    jittered = (ours.factors != np.array([1.0, 1.0, 1.0, 0.0])).any(axis=1)
    assert _same_fraction(int(jittered.sum()), views, len(pil.jitters), views) > ACCEPT
    pil_factors = np.array([params[1:] for params in pil.jitters])  # brightness, contrast, saturation, hue
    for op, name in enumerate(("brightness", "contrast", "saturation", "hue")):
        assert stats.ks_2samp(ours.factors[jittered, op], pil_factors[:, op]).pvalue > ACCEPT, name

    for name, drawn in (("grayscale", ours.grayscale), ("solarize", ours.solarize), ("flip", ours.flip)):
        assert _same_fraction(int(drawn.sum()), views, pil.counts[name], views) > ACCEPT, name

    # Negative control: the seed recipe's draws (crop scale from 0.08, no grayscale) are told apart.
    seed = G.BatchAugment("seed", 32, "cifar100").draw(views, 32, 32, np.random.default_rng(9))
    assert stats.ks_2samp(seed.height * seed.width / 1024, pil_area).pvalue < REJECT
    assert _same_fraction(int(seed.grayscale.sum()), views, pil.counts["grayscale"], views) < REJECT
