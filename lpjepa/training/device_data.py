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
from torch.utils.data import DataLoader, Dataset

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

    ``num_workers`` > 0 (CPU images only) makes whole batches in that many worker
    processes of one thread each, as the PIL loader's workers make images: on a CPU shared
    with the model's step, or with other programs, that keeps the batched ops off the
    threads the step uses, where each op's parallel region would wait for them. The views
    are the same either way: they depend on the batch's key alone.
    """

    def __init__(self, images, labels, sampler, batch_size, augment: BatchAugment, seed=0, rank=0, num_workers=0):
        self.sampler, self.batch_size = sampler, batch_size
        self.maker = BatchMaker(images, labels, augment, seed, rank)
        self.workers = None
        if num_workers > 0 and images.device.type == "cpu":
            # batch_size=None: each key is a whole batch. The keys come from this loader, so the
            # workers, kept from epoch to epoch, hold no state of their own.
            self.workers = DataLoader(self.maker, batch_size=None, sampler=_EpochKeys(self), num_workers=num_workers,
                                      persistent_workers=True, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def keys(self):
        """This epoch's batches as ``(image indices, epoch, step)``, the step counted from the epoch's start."""
        order = np.fromiter((index for index, _ in self.sampler), dtype=np.int64)
        first_step = self.sampler.skip // self.batch_size
        return [(order[b * self.batch_size : (b + 1) * self.batch_size], self.sampler.epoch, first_step + b)
                for b in range(len(self))]

    def __iter__(self):
        if self.workers is not None:
            return iter(self.workers)
        return (self.maker[key] for key in self.keys())


class BatchMaker(Dataset):
    """One two-view batch per key ``(image indices (int64 numpy), epoch, step)``: ``(view1, view2, labels)``.

    The views are drawn from a generator seeded by (seed, epoch, step, rank).
    """

    def __init__(self, images, labels, augment, seed=0, rank=0):
        self.images, self.labels, self.augment, self.seed, self.rank = images, labels, augment, seed, rank

    def __getitem__(self, key):
        index, epoch, step = key
        height, width = self.images.shape[-2:]
        rng = np.random.default_rng(view_seed(self.seed, epoch, step, self.rank))
        params = self.augment.draw(2 * len(index), height, width, rng)
        views = self.augment.views(self.images, np.concatenate([index, index]), params)
        labels = self.labels.index_select(0, to_device(index, self.labels.device))
        return views[: len(index)], views[len(index) :], labels

    def __len__(self):
        return len(self.images)


class _EpochKeys:
    """The worker loader's sampler: the owner's keys of the epoch its sampler is set to, read at each pass."""

    def __init__(self, owner):
        self.owner = owner

    def __iter__(self):
        return iter(self.owner.keys())

    def __len__(self):
        return len(self.owner)
