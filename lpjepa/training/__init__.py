"""The training program's parts; ``lpjepa.train``, ``lpjepa.eval``, ``lpjepa.plot`` and
``lpjepa.export`` are the programs over them (their command lines), and nothing here
imports those.

cli         one-line errors (``UsageError``, exit code 2) and the table-driven flag checks
config      defaults, presets, the command line, how they combine, the training flags' rules
checkpoint  atomic save, load, RNG states, the checkpoint's format (full and final), a model for evaluation
data        datasets, augmentations, samplers, loaders
device_data the training split held on the device, two-view batches augmented there
gpu_augment the view augmentation on batches of image tensors, with torchvision's semantics
speed       the CUDA speed switches: amp dtype, channels_last, torch.compile, fused optimizers
model       backbone with its stem, and the seed's projector
loop        ``train(cfg)``: the train state, one step, one epoch, the end of an epoch
guard       the non-finite-loss guard: a device-side flag per step, read every N steps and before a save
evaluation  kNN, linear probes, sparsity; online every epoch and offline from a checkpoint
optim       optimizers (AdamW, solo-learn's LARS) and the learning-rate schedule (solo-learn's warm-up and cosine)
interrupt   Ctrl-C / SIGTERM: finish the step, save, exit
runlog      the run folder: config.json, metrics.csv, TensorBoard, progress, epoch lines
plot        curves from metrics.csv and eval.json
export      the backbone and projector as safetensors files, and how timm loads them
torchrun    process-group set-up and the collectives the loop needs (the loss's own
            global-batch machinery is ``lpjepa.distributed``)

Of the package, only this (and the programs over it) imports timm and torchvision; the
seed's reference model, the tests' oracle, imports timm where it is built.
"""
