"""A kernel launch as data, so the compile report sees exactly what the launchers run."""
from typing import Any, NamedTuple


class KernelLaunch(NamedTuple):
    """One ``kernel[grid](*args, **meta)`` call; ``meta`` holds constexprs and num_warps/num_stages.

    The launchers build these with their heuristics and call them; the compile report
    builds the same ones on ``meta``-device tensors and compiles instead of launching.
    """

    kernel: Any
    grid: tuple
    args: tuple
    meta: dict

    def __call__(self):
        return self.kernel[self.grid](*self.args, **self.meta)
