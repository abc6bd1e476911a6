"""The ops layer: one file per op, each holding its torch.library op(s) for both backends,
their fake, their autograd formula and the choice of backend. The public API in
``lpjepa`` calls these; they call the launchers in ``lpjepa.kernels``.
"""
