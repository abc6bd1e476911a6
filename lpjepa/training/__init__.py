"""The training program's parts: configuration, data, model, checkpoints, the loop,
evaluation, run logs and plots. ``python -m lpjepa.train`` is the program itself.

Only this package (and the programs over it) imports timm and torchvision.
"""
