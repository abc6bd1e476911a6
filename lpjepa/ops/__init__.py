"""The ops layer: one file per op, each holding its autograd Function with the torch and Triton
bodies side by side (``sliced_wasserstein``, ``rgg_sample``), plus which body runs a call
(``backend``), which kernel path runs a step (``path_choice``) and the same bodies as
``torch.library`` ops for ``torch.compile`` (``compiled``). The public API in ``lpjepa``
calls these; they call the launch plans in ``lpjepa.kernels``.
"""
