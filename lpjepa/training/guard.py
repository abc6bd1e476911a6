"""The non-finite-loss guard: a run whose loss has become NaN or inf stops, and no checkpoint holds what came after.

``NonFiniteGuard.observe`` runs every step and only queues tensor ops: the first failing
step and the loss parts at that step are kept in device tensors, with no ``.item()``, so
a step never waits for the GPU. The loop reads the guard's ``flags()`` in the same read
as its step statistics (every ``--log-every`` steps and at an epoch's end), and ``check``
(one host sync) always before it writes a checkpoint, so a checkpoint never holds
weights from after the first failing step. ``check`` raises
``NonFiniteLoss``, whose text names the step, the parts' values there, the likely
causes and the last good checkpoint.

What fails:

- without a ``GradScaler`` (fp32, bf16, the CPU): any step whose loss or one of its
  parts is NaN or inf, since its update has already reached the weights;
- under fp16 AMP with a ``GradScaler``: ``MAX_CONSECUTIVE_SKIPS`` steps in a row that
  the scaler skipped. A skipped step (non-finite gradients, the scale then halved)
  leaves the weights as they were and is part of normal fp16 training; a long run of
  them means every step overflows. The skips are read from the scaler's scale on the
  device (it drops exactly on a skipped step), the message then names the first step
  of the run of skips.
"""
import math

import torch

# The scaler halves its scale at each skipped step: 25 skips in a row take the default
# initial 2**16 down to 2**-9, where no finite gradient of a working model overflows.
MAX_CONSECUTIVE_SKIPS = 25
# The loss parts the guard keeps, in the order of ``LossParts``' fields it reads.
PART_NAMES = ("loss", "invariance", "regularizer")
# Exit code of a run the guard stopped (2 is a bad command line, 128 + N a signal).
NON_FINITE_EXIT_CODE = 3
NO_STEP = -1


class NonFiniteLoss(Exception):
    """The run's loss became non-finite at ``step`` (1-based global step); ``parts`` are the loss parts there."""

    def __init__(self, step, parts, skipped_steps=0, weights_only=False):
        self.step, self.parts, self.skipped_steps, self.weights_only = step, parts, skipped_steps, weights_only
        super().__init__(f"non-finite loss at step {step}: {parts}")


class NonFiniteGuard:
    """Device-side record of the first failing step, read only when ``check`` is called.

    device: where the loss lives. scaler: the run's ``torch.amp.GradScaler`` when it is
    enabled (fp16 AMP), else None. max_skips: skipped steps in a row that fail a run
    under a scaler.
    """

    def __init__(self, device, scaler=None, max_skips=MAX_CONSECUTIVE_SKIPS):
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.max_skips = max_skips
        self.first_bad_step = torch.full((), NO_STEP, dtype=torch.int64, device=device)
        self.first_bad_parts = torch.zeros(len(PART_NAMES), dtype=torch.float32, device=device)
        self.failed_by_skips = torch.zeros((), dtype=torch.bool, device=device)
        # Under a scaler: the current run of skipped steps, where it started, the parts there,
        # and the scale before the last update (what a drop is measured against).
        self.skip_run = torch.zeros((), dtype=torch.int64, device=device)
        self.skip_run_step = torch.full((), NO_STEP, dtype=torch.int64, device=device)
        self.skip_run_parts = torch.zeros_like(self.first_bad_parts)
        self.scale_before = None

    def observe(self, step, loss_parts):
        """Record step ``step`` (1-based, after the optimizer step and ``scaler.update()``); no host sync.

        loss_parts: the step's ``LossParts`` (0-dim tensors). Returns nothing: the
        verdict stays on the device until ``check``.
        """
        parts = torch.stack([getattr(loss_parts, name).detach().float() for name in PART_NAMES])
        if self.scaler is None:
            failed, fail_step, fail_parts = ~torch.isfinite(parts).all(), step, parts
        else:
            failed, fail_step, fail_parts = self._observe_skips(step, parts)
        first = failed & (self.first_bad_step == NO_STEP)
        self.first_bad_step = torch.where(first, fail_step, self.first_bad_step)
        self.first_bad_parts = torch.where(first, fail_parts, self.first_bad_parts)
        if self.scaler is not None:
            self.failed_by_skips = self.failed_by_skips | first

    def _observe_skips(self, step, parts):
        """(failed, first step of the run of skips, the parts there) after this step's ``scaler.update()``."""
        # GradScaler keeps its scale in a device tensor (``_scale``) and lowers it exactly
        # when it skipped the step; get_scale() would copy it to the host.
        scale = self.scaler._scale
        if self.scale_before is None:
            self.scale_before = torch.full_like(scale, self.scaler._init_scale)
        skipped = scale < self.scale_before
        self.scale_before = scale.detach().clone()
        starts = skipped & (self.skip_run == 0)
        self.skip_run_step = torch.where(starts, step, self.skip_run_step)
        self.skip_run_parts = torch.where(starts, parts, self.skip_run_parts)
        self.skip_run = torch.where(skipped, self.skip_run + 1, 0)
        return self.skip_run >= self.max_skips, self.skip_run_step, self.skip_run_parts

    def flags(self):
        """The verdict as a (2,) float64 device tensor (first failing step, failed by skips), for one read with other values."""
        return torch.stack([self.first_bad_step, self.failed_by_skips.long()]).double()

    def raise_if_failed(self, flags):
        """Raise ``NonFiniteLoss`` if ``flags``, the host values of ``flags()``, say a step has failed."""
        first_bad_step, failed_by_skips = (int(v) for v in flags)
        if first_bad_step != NO_STEP:
            parts = dict(zip(PART_NAMES, self.first_bad_parts.tolist()))
            raise NonFiniteLoss(first_bad_step, parts, skipped_steps=self.max_skips if failed_by_skips else 0)

    def check(self, model=None):
        """Raise ``NonFiniteLoss`` if a step has failed; one host sync.

        model: before a checkpoint, also check its parameters are finite (a finite loss
        whose gradient overflowed in the last step leaves non-finite weights behind).
        """
        flags = [self.flags()]
        if model is not None:
            finite = torch.stack([p.detach().isfinite().all().to(self.first_bad_step.device) for p in model.parameters()]).all()
            flags.append((~finite).double()[None])
        values = torch.cat(flags).tolist()
        self.raise_if_failed(values[:2])
        if len(values) > 2 and values[2]:
            raise NonFiniteLoss(None, {}, weights_only=True)


def _format_parts(parts):
    return ", ".join(f"{name} {value:.6g}" if math.isfinite(value) else f"{name} {value}" for name, value in parts.items())


def describe(error, *, steps_per_epoch, current_step, lr, amp, last_good):
    """The message of a stopped run: where it failed, the parts there, the likely causes, the last good checkpoint.

    error: the ``NonFiniteLoss``. current_step: the step the run had reached when the
    guard read its flag. lr: the run's ``--lr``; amp: whether fp16 mixed precision was
    on. last_good: a text naming the last checkpoint written before the failure (or
    saying there is none).
    """
    if error.weights_only:
        where = f"the model's weights became non-finite by step {current_step} (the loss was finite up to there)"
    else:
        epoch, batch = divmod(error.step - 1, steps_per_epoch)
        where = f"the loss became non-finite at step {error.step} (epoch {epoch + 1}, batch {batch + 1})"
        if error.skipped_steps:
            where += f": fp16 AMP skipped {error.skipped_steps} steps in a row from there on"
        where += f"; at that step: {_format_parts(error.parts)}"
    causes = [
        f"a learning rate too high for this model and batch (--lr {lr}; try a tenth of it)",
        "fp16 overflow under mixed precision (--no-amp, or a lower --lr)" if amp else None,
        "bad data: NaN or inf in the inputs, or images that do not decode to numbers",
    ]
    cause_text = "; ".join(c for c in causes if c)
    return (
        f"stopped at step {current_step}: {where}.\n"
        f"  likely causes: {cause_text}.\n"
        f"  last good checkpoint: {last_good}."
    )
