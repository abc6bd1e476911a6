"""The training split held on the device as uint8, and two-view batches augmented there (``gpu_augment``).

The alternative to the PIL pipeline of ``data`` for datasets that fit in memory (CIFAR):
the images go to the device once; each step gathers its batch there and augments both
views of every image in a few tensor ops, so no worker process decodes, augments or
copies an image.

Randomness: the order is the ``EpochSampler``'s, as in the PIL pipeline. The views of
step s of epoch e (counted from the epoch's start, also after a mid-epoch resume) are
drawn from a numpy generator seeded by (seed, epoch, s, rank), so a resumed run sees
the views an uninterrupted one would, and the global RNGs are never touched.
"""
import numpy as np
import torch

from .gpu_augment import BatchAugment, to_device, view_seed


def device_images(dataset, device):
    """(images (N, 3, H, W) uint8, labels (N,) int64) of a torchvision CIFAR dataset, on ``device``.

    Needs a dataset with ``data`` (N, H, W, 3) uint8 and ``targets``, as torchvision's
    CIFAR-10/100 have.
    """
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(np.asarray(dataset.targets, dtype=np.int64))
    return images.to(device), labels.to(device)


def holds_images_in_memory(dataset):
    """Whether ``device_images`` can take this dataset (an in-memory uint8 array of RGB images)."""
    data = getattr(dataset, "data", None)
    return isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4 and data.shape[-1] == 3


class DeviceTwoViewLoader:
    """Batches ``(view1, view2, labels)`` on the device, in the order of an ``EpochSampler``.

    ``images``/``labels``: from ``device_images``. Each batch is ``batch_size`` images of
    the sampler's order (the last partial batch is dropped, as the PIL loader does); the
    views are (batch_size, 3, S, S) float32, normalised. ``len()`` is the number of
    batches left in the epoch the sampler is set to.
    """

    def __init__(self, images, labels, sampler, batch_size, augment: BatchAugment, seed=0, rank=0):
        self.images, self.labels = images, labels
        self.sampler, self.batch_size = sampler, batch_size
        self.augment, self.seed, self.rank = augment, seed, rank

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        order = np.fromiter((index for index, _ in self.sampler), dtype=np.int64)
        epoch = self.sampler.epoch
        first_step = self.sampler.skip // self.batch_size
        height, width = self.images.shape[-2:]
        for batch in range(len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            rng = np.random.default_rng(view_seed(self.seed, epoch, first_step + batch, self.rank))
            params = self.augment.draw(2 * len(index), height, width, rng)
            views = self.augment.views(self.images, np.concatenate([index, index]), params)
            labels = self.labels.index_select(0, to_device(index, self.labels.device))
            yield views[: len(index)], views[len(index) :], labels
