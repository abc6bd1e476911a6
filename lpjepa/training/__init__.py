"""The training program's parts; ``lpjepa.train``, ``lpjepa.eval`` and ``lpjepa.plot`` are
the programs over them (their command lines), and nothing here imports those.

config      defaults, presets, the command line, how they combine
checkpoint  atomic save, load, RNG states, the checkpoint's format, a model for evaluation
data        datasets, augmentations, samplers, loaders
device_data the training split held on the device, two-view batches augmented there
gpu_augment the view augmentation on batches of image tensors, with torchvision's semantics
speed       the CUDA speed switches: amp dtype, channels_last, torch.compile, fused optimizers
model       backbone with its stem, and the seed's projector
loop        ``train(cfg)``: the train state, one step, one epoch, the end of an epoch
evaluation  kNN, linear probes, sparsity; online every epoch and offline from a checkpoint
optim       optimizers and the learning-rate schedule
interrupt   Ctrl-C / SIGTERM: finish the step, save, exit
runlog      the run folder: config.json, metrics.csv, TensorBoard, progress, epoch lines
plot        curves from metrics.csv
torchrun    process-group set-up and the collectives the loop needs (the loss's own
            global-batch machinery is ``lpjepa.distributed``)

Of the package, only this (and the programs over it) imports timm and torchvision; the
seed's reference model, the tests' oracle, imports timm where it is built.
"""
