"""Datasets, augmentations and loaders for pretraining and evaluation.

Three sources, all through torchvision: ``cifar100`` (the seed's), ``cifar10`` and
``imagefolder`` (a folder of class sub-folders). A missing dataset stops the program with
a message that says where the files were expected and how to get them, never with a
traceback from inside torchvision.

Randomness: the training order comes from a ``DistributedSampler`` (also with one
process) seeded by ``--seed`` and the epoch, and every training sample seeds its own
augmentations from (seed, epoch, index). So the two views of an image are a function
of the seed and the epoch alone: they do not depend on the number of workers, and a
run resumed from a checkpoint, even one saved mid-epoch, sees the same images with
the same augmentations as an uninterrupted run.
"""
import os
import shutil

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets, transforms

from .cli import UsageError

DATASETS = ("cifar100", "cifar10", "imagefolder")

# (mean, std) used by Normalize. The seed uses the CIFAR-100 statistics.
NORMALIZATION = {
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# The official run's statistics where they differ from the seed's: solo-learn's MEANS_N_STD
# (YilunKuang/rectified-lp-jepa@5ae61ab, solo/data/pretrain_dataloader.py, build_transform_pipeline).
OFFICIAL_NORMALIZATION = {"cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}

CIFAR_CLASSES = {"cifar100": datasets.CIFAR100, "cifar10": datasets.CIFAR10}

AUGMENTATIONS = ("seed", "paper")

# The numbers of each view augmentation, shared by the PIL pipeline (``train_transform``)
# and the batched one on tensors (``gpu_augment``): crop scale and aspect ratio, the crop's
# resize filter, ColorJitter's (brightness, contrast, saturation, hue) strengths and the
# probabilities of jitter, grayscale, solarize (threshold 128 of 255) and horizontal flip,
# and the normalisation (``normalization``).
# 'paper' is the official CIFAR-100 run's (scripts/pretrain/cifar/rectified_lpjepa_cifar100.yaml,
# augmentations; bicubic and the order of the ops from solo/data/pretrain_dataloader.py).
RECIPES = {
    "seed": {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "interpolation": "bilinear", "jitter": (0.4, 0.4, 0.4, 0.1),
             "jitter_p": 1.0, "grayscale_p": 0.0, "solarize_p": 0.0, "solarize_threshold": 128, "flip_p": 0.5},
    "paper": {"scale": (0.2, 1.0), "ratio": (3 / 4, 4 / 3), "interpolation": "bicubic", "jitter": (0.4, 0.4, 0.2, 0.1),
              "jitter_p": 0.8, "grayscale_p": 0.2, "solarize_p": 0.1, "solarize_threshold": 128, "flip_p": 0.5},
}
INTERPOLATIONS = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}


def normalization(augmentation, dataset):
    """(mean, std) of Normalize for a recipe on a dataset: the official statistics under 'paper', else ``NORMALIZATION``."""
    if augmentation == "paper" and dataset in OFFICIAL_NORMALIZATION:
        return OFFICIAL_NORMALIZATION[dataset]
    return NORMALIZATION[dataset]


def augmentation_recipe(augmentation, dataset="cifar100"):
    """The numbers of a recipe as plain JSON values (tuples as lists), with its normalisation on ``dataset``."""
    recipe = {k: list(v) if isinstance(v, tuple) else v for k, v in RECIPES[augmentation].items()}
    mean, std = normalization(augmentation, dataset)
    return {**recipe, "mean": list(mean), "std": list(std)}

# Stride between the per-sample seeds of successive --seed values. Prime, so that one
# image gets the same seed under two --seed values only when the dataset's length or
# the difference of the epochs is a multiple of it.
SAMPLE_SEED_STRIDE = 1_000_003
# Per-sample seeds stay non-negative int64 values.
SAMPLE_SEED_RANGE = 2**63


def train_transform(augmentation="seed", image_size=32, dataset="cifar100"):
    """The view augmentation on PIL images (``RECIPES`` holds its numbers).

    'seed': the seed notebook's RandomResizedCrop, flip, ColorJitter(0.4, 0.4, 0.4, 0.1)
    applied to every view. 'paper': the official CIFAR-100 run's (solo-learn's pipeline):
    crop scale (0.2, 1), bicubic, jitter (0.4, 0.4, 0.2, 0.1) with probability 0.8,
    grayscale 0.2, solarize 0.1, flip, the official normalisation.
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}; got {augmentation!r}")
    mean, std = normalization(augmentation, dataset)
    r = RECIPES[augmentation]
    crop = transforms.RandomResizedCrop(image_size, scale=r["scale"], ratio=r["ratio"],
                                        interpolation=INTERPOLATIONS[r["interpolation"]])
    flip = transforms.RandomHorizontalFlip(r["flip_p"])
    jitter = transforms.ColorJitter(*r["jitter"])
    if augmentation == "seed":
        ops = [crop, flip, jitter]
    else:
        ops = [
            crop,
            transforms.RandomApply([jitter], p=r["jitter_p"]),
            transforms.RandomGrayscale(p=r["grayscale_p"]),
            transforms.RandomSolarize(r["solarize_threshold"], p=r["solarize_p"]),
            flip,
        ]
    return transforms.Compose(ops + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def eval_transform(image_size=32, dataset="cifar100", augmentation="seed"):
    """Deterministic transform for probes and kNN: resize the short side, center-crop, normalize as the recipe's training views.

    (The official run's validation loader normalises CIFAR-100 with CIFAR-10's statistics,
    solo/data/classification_dataloader.py; a mismatch with its own training views that
    this program does not copy: docs/training.md.)
    """
    mean, std = normalization(augmentation, dataset)
    return transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


class TwoViewDataset(Dataset):
    """Two augmented views of each image, as in the seed, with per-sample seeded augmentations.

    Indexed by ``(index, epoch)`` pairs (what ``EpochSampler`` yields): the views of
    image ``index`` in epoch ``epoch`` are drawn from a torch RNG seeded by
    (seed, epoch, index), inside ``torch.random.fork_rng`` so the caller's RNG is left
    as it was. A plain integer index uses epoch 0. Returns ``(view1, view2, label)``.
    """

    def __init__(self, base_dataset, transform, seed=0):
        self.base_dataset = base_dataset
        self.transform = transform
        self.seed = int(seed)

    def sample_seed(self, index, epoch):
        return (self.seed * SAMPLE_SEED_STRIDE + epoch * len(self.base_dataset) + index) % SAMPLE_SEED_RANGE

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        img, label = self.base_dataset[index]
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone (the transforms draw from it): torch.manual_seed would also
            # re-seed every CUDA generator, outside what fork_rng restores, and in a process without
            # CUDA queue that call with a captured stack trace, milliseconds per sample.
            torch.random.default_generator.manual_seed(self.sample_seed(index, epoch))
            return self.transform(img), self.transform(img), label

    def __len__(self):
        return len(self.base_dataset)


class EpochSampler(DistributedSampler):
    """A DistributedSampler (one replica by default) that yields ``(index, epoch)`` pairs.

    The order is a function of (seed, epoch), as in DistributedSampler. ``set_epoch(epoch,
    skip=n)`` also skips this replica's first n samples of the epoch, for a resume from
    a mid-epoch checkpoint.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[self.skip :]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self):
        return self.num_samples - self.skip


class DataNotFound(UsageError):
    """The dataset is not where the command line says; the message's first line says so, the next ones how to fix it."""


def _without_md5(cls):
    """A subclass of a torchvision CIFAR class whose file list carries no md5: files need only exist."""
    return type(
        f"Local{cls.__name__}",
        (cls,),
        {
            "__doc__": f"{cls.__name__} from a local folder in the official format, without torchvision's md5 check.",
            "train_list": [[name, None] for name, _ in cls.train_list],
            "test_list": [[name, None] for name, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        },
    )


# torchvision accepts only files whose md5 matches the official archive. These trust any
# pickles in the official format (a re-packed copy, or a small generated one for tests);
# used when --skip-data-check is given.
LocalCIFAR100 = _without_md5(datasets.CIFAR100)
LocalCIFAR10 = _without_md5(datasets.CIFAR10)

LOCAL_CIFAR_CLASSES = {"cifar100": LocalCIFAR100, "cifar10": LocalCIFAR10}


def _how_to_get(dataset, root, offer_download=True):
    """The lines after a missing-CIFAR error: where to get it; ``offer_download`` after a download that failed is False."""
    cls = CIFAR_CLASSES[dataset].__name__
    lines = [
        f"  on a machine with network run: python -c \"import torchvision; torchvision.datasets.{cls}('DIR', download=True)\"",
        f"  then copy DIR/{CIFAR_CLASSES[dataset].base_folder}/ into {root}/;",
    ]
    if offer_download:
        lines.append("  or drop --no-download and this program downloads it;")
    lines.append("  or train on your own images: --dataset imagefolder --data-dir FOLDER (FOLDER/train/CLASS/IMAGE, FOLDER/val/CLASS/IMAGE)")
    return "\n".join(lines)


def _cifar_root(data_dir, base_folder):
    """Accept either the parent of ``cifar-100-python/`` or that folder itself."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    if os.path.basename(os.path.normpath(data_dir)) == base_folder:
        return os.path.dirname(os.path.normpath(data_dir))
    return data_dir


def _download_cifar(dataset, root, folder, train):
    """torchvision's download into ``root``; on failure removes the folder it created and raises ``DataNotFound``."""
    created = not os.path.exists(root)
    try:
        os.makedirs(root, exist_ok=True)
        return CIFAR_CLASSES[dataset](root, train=train, download=True)
    except Exception as error:  # no network, proxy, disk full: say so without torchvision's traceback
        if created:
            shutil.rmtree(root, ignore_errors=True)
        reason = str(error).splitlines()[0] if str(error) else ""
        raise DataNotFound(
            f"argument --data-dir: {dataset} is not in {root} (expected {folder}/) and downloading it failed "
            f"({type(error).__name__}: {reason}); to get it:\n" + _how_to_get(dataset, root, offer_download=False)
        ) from None


def load_cifar(dataset, data_dir, train, download=True, skip_data_check=False):
    """CIFAR-10/100 split from ``data_dir`` (the folder holding ``cifar-10{0}-...``).

    Tries the local copy first; if there is none and ``download`` is set, downloads it.
    Every failure ends in ``DataNotFound`` with instructions.
    """
    cls = (LOCAL_CIFAR_CLASSES if skip_data_check else CIFAR_CLASSES)[dataset]
    root = _cifar_root(data_dir, cls.base_folder)
    folder = os.path.join(root, cls.base_folder)
    try:
        return cls(root, train=train, download=False)
    except RuntimeError as error:
        if "not found or corrupted" not in str(error):
            raise
    expected = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    if os.path.isdir(folder) and all(os.path.isfile(os.path.join(folder, n)) for n in expected):
        raise DataNotFound(
            f"argument --data-dir: the {dataset} files in {folder} do not match torchvision's checksums of the official archive\n"
            f"  a copy you trust (re-packed or generated): pass --skip-data-check to use it as it is;\n"
            f"  otherwise delete the folder and get the official one:\n" + _how_to_get(dataset, root)
        )
    if download:
        return _download_cifar(dataset, root, folder, train)
    raise DataNotFound(
        f"argument --data-dir: {dataset} is not in {root} (expected {folder}/ with {', '.join(expected)}) "
        f"and --no-download is set; to get it:\n" + _how_to_get(dataset, root)
    )


IMAGEFOLDER_LAYOUT = "a folder holding train/CLASS/IMAGE and val/CLASS/IMAGE"


def check_data_paths(cfg):
    """Refuse, before any work, image-folder paths that do not exist, naming the flag and the path.

    CIFAR needs no check here: a missing copy is downloaded, or (``--no-download``)
    refused by ``load_cifar`` before anything is trained.
    """
    if cfg["dataset"] == "imagefolder":
        imagefolder_dirs(cfg["data_dir"], cfg["val_dir"])


def imagefolder_dirs(data_dir, val_dir=None):
    """(train_dir, val_dir): ``--data-dir`` holding train/ and val/, or ``--data-dir TRAIN`` with ``--val-dir VAL``.

    ``DataNotFound`` names the flag whose folder is missing.
    """
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.isdir(data_dir):
        raise DataNotFound(f"argument --data-dir: {data_dir} does not exist (--dataset imagefolder reads {IMAGEFOLDER_LAYOUT})")
    if val_dir is not None:
        val_dir = os.path.abspath(os.path.expanduser(val_dir))
        if not os.path.isdir(val_dir):
            raise DataNotFound(f"argument --val-dir: {val_dir} does not exist")
        return data_dir, val_dir
    if os.path.isdir(os.path.join(data_dir, "train")) and os.path.isdir(os.path.join(data_dir, "val")):
        return os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    raise DataNotFound(
        f"argument --data-dir: {data_dir} holds no train/ and val/ folders; --dataset imagefolder reads "
        f"{IMAGEFOLDER_LAYOUT} (or the training folder as --data-dir with --val-dir VAL_DIR)"
    )


def load_imagefolder(folder, flag):
    if not os.path.isdir(folder):
        raise DataNotFound(f"argument {flag}: {folder} does not exist (--dataset imagefolder reads {IMAGEFOLDER_LAYOUT})")
    try:
        return datasets.ImageFolder(folder)
    except (FileNotFoundError, RuntimeError) as error:
        reason = str(error).splitlines()[0]
        raise DataNotFound(f"argument {flag}: {folder} is not a folder of class sub-folders holding images ({reason})") from None


def load_splits(dataset, data_dir, val_dir=None, download=True, skip_data_check=False):
    """(train, val) torchvision datasets of PIL images and integer labels, without transforms."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}; got {dataset!r}")
    if dataset == "imagefolder":
        train_dir, val_dir = imagefolder_dirs(data_dir, val_dir)
        train, val = load_imagefolder(train_dir, "--data-dir"), load_imagefolder(val_dir, "--val-dir")
        if train.classes != val.classes:
            raise DataNotFound(f"argument --data-dir: its training classes {train.classes} differ from the validation classes {val.classes}")
        return train, val
    train = load_cifar(dataset, data_dir, True, download, skip_data_check)
    return train, load_cifar(dataset, data_dir, False, download, skip_data_check)


def run_splits(cfg, download=None):
    """``load_splits`` with a run config's data flags; ``download`` overrides its ``--download``."""
    download = cfg["download"] if download is None else download
    return load_splits(cfg["dataset"], cfg["data_dir"], cfg["val_dir"], download, cfg["skip_data_check"])


class Transformed(Dataset):
    """A dataset of (PIL image, label) with a transform applied to the image."""

    def __init__(self, base_dataset, transform):
        self.base_dataset = base_dataset
        self.transform = transform

    def __getitem__(self, index):
        img, label = self.base_dataset[index]
        return self.transform(img), label

    def __len__(self):
        return len(self.base_dataset)


def num_classes(dataset):
    return len(dataset.classes)


def smallest_class_count(labels):
    """The number of examples of the least represented class in ``labels`` (a sequence or tensor of class indices,
    e.g. a torchvision dataset's ``targets``)."""
    counts = torch.bincount(torch.as_tensor(labels).flatten().cpu())
    return int(counts[counts > 0].min())


def make_loader(dataset, batch_size, *, num_workers, pin_memory, sampler=None, drop_last=False):
    """A DataLoader with worker processes (persistent when there are any) and pinned memory on CUDA.

    Its own ``generator`` keeps the loader from drawing worker seeds from the global RNG,
    so creating an iterator does not shift the loss's random directions.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(0),
    )


def eval_loaders(cfg, train, val, batch_size, pin_memory):
    """Loaders of the train split without augmentation (the kNN bank, the offline probes' data) and of the validation split."""
    transform = eval_transform(cfg["image_size"], cfg["dataset"], cfg.get("augmentation", "seed"))
    return tuple(
        make_loader(Transformed(split, transform), batch_size, num_workers=cfg["num_workers"], pin_memory=pin_memory)
        for split in (train, val)
    )
