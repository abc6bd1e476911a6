"""Ctrl-C and SIGTERM as a request to finish the current step, save a checkpoint and exit."""
import signal
import sys
import threading

import torch

from . import torchrun


class StopRequest:
    """Catches Ctrl-C and SIGTERM until ``restore()`` puts the previous handlers back.

    The first signal only sets ``signum``: the loop finishes its step, saves and exits.
    A second Ctrl-C stops at once. Python lets only the main thread install signal
    handlers, so in any other thread (a run started from a thread) nothing is caught.
    """

    def __init__(self):
        self.signum = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint", file=sys.stderr, flush=True)

    def requested(self, env, device):
        """Whether any process got a signal. Under DDP the processes agree (a max over them), so all stop at the same step."""
        if not env.distributed:
            return self.signum is not None
        flag = torch.tensor([0.0 if self.signum is None else float(self.signum)], device=device)
        signum = int(torchrun.all_reduce(flag, env, op="max").item())  # the one read of this check
        if self.signum is None and signum > 0:
            self.signum = signum
        return signum > 0

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
