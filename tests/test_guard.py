"""The non-finite-loss guard: a NaN injected mid-run stops it with the message and exit code, and last.pt stays good.

The guard alone is checked too: a failing step is named with its parts, a step under a
grad scaler that skips now and then is not a failure but a long run of skips is, and
``observe`` never reads a tensor on the host.
"""
import contextlib
import math

import pytest
import torch

from lpjepa import train
from lpjepa.loss import LossParts
from lpjepa.training import loop
from lpjepa.training.guard import NON_FINITE_EXIT_CODE, NonFiniteGuard, NonFiniteLoss, describe
from lpjepa.training.model import LpJEPA
from _state import patched
from test_train import assert_same_state, load, run_args

NAN = float("nan")


def parts(loss, invariance=0.5, regularizer=0.25):
    return LossParts(*(torch.as_tensor(v, dtype=torch.float32) for v in (loss, invariance, regularizer)))


# ----------------------------------------------------------------------------- the guard alone


def test_the_first_non_finite_step_is_named_with_its_parts():
    guard = NonFiniteGuard(torch.device("cpu"))
    for step, loss in enumerate([1.0, 2.0, NAN, math.inf, 3.0], start=1):
        guard.observe(step, parts(loss, regularizer=NAN if loss != loss else 0.25))
    with pytest.raises(NonFiniteLoss) as failed:
        guard.check()
    assert failed.value.step == 3 and failed.value.skipped_steps == 0
    assert math.isnan(failed.value.parts["loss"]) and failed.value.parts["invariance"] == 0.5
    assert math.isnan(failed.value.parts["regularizer"])


def test_finite_steps_pass_and_non_finite_weights_are_caught_before_a_save():
    guard = NonFiniteGuard(torch.device("cpu"))
    model = torch.nn.Linear(3, 2)
    for step in range(1, 6):
        guard.observe(step, parts(float(step)))
    guard.check(model)  # nothing to say
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteLoss) as failed:
        guard.check(model)
    assert failed.value.weights_only


def test_observe_reads_nothing_on_the_host():
    guard = NonFiniteGuard(torch.device("cpu"))

    def no_sync(*args, **kwargs):
        raise AssertionError("observe read a tensor on the host")

    with contextlib.ExitStack() as reads_refused:
        for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
            reads_refused.enter_context(patched(torch.Tensor, name, no_sync))
        for step in range(1, 4):
            guard.observe(step, parts(NAN if step == 2 else 1.0))
    with pytest.raises(NonFiniteLoss):
        guard.check()


def _scaled_steps(guard, scaler, losses, first_step=1):
    """Run one SGD step per loss through the grad scaler (on the CPU), observing each."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for step, factor in enumerate(losses, start=first_step):
        loss = (weight * factor).sum()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        guard.observe(step, parts(loss.detach()))
    return weight


def test_under_a_grad_scaler_isolated_skips_pass_and_a_long_run_of_them_fails():
    scaler = torch.amp.GradScaler("cpu")
    guard = NonFiniteGuard(torch.device("cpu"), scaler, max_skips=4)
    # Three skips in a row (an inf gradient), then finite steps, then one more skip: normal fp16 training.
    _scaled_steps(guard, scaler, [math.inf] * 3 + [1.0] * 5 + [math.inf] + [1.0])
    guard.check()
    # Four skips in a row from step 13 on: the run fails there, with the parts of step 13.
    _scaled_steps(guard, scaler, [1.0, 1.0] + [math.inf] * 4, first_step=11)
    with pytest.raises(NonFiniteLoss) as failed:
        guard.check()
    assert failed.value.skipped_steps == 4 and failed.value.step == 13
    assert math.isinf(failed.value.parts["loss"])


def test_the_message_names_step_parts_causes_and_checkpoint():
    error = NonFiniteLoss(6, {"loss": NAN, "invariance": 0.0123, "regularizer": math.inf})
    text = describe(error, steps_per_epoch=4, current_step=8, lr=0.001, amp=True, last_good="runs/x/checkpoints/last.pt (epoch 1, step 4)")
    assert "non-finite at step 6 (epoch 2, batch 2)" in text and "loss nan, invariance 0.0123, regularizer inf" in text
    assert "--lr 0.001" in text and "fp16 overflow" in text and "bad data" in text
    assert "last good checkpoint: runs/x/checkpoints/last.pt (epoch 1, step 4)" in text
    assert "fp16" not in describe(error, steps_per_epoch=4, current_step=8, lr=0.001, amp=False, last_good="none")


# ----------------------------------------------------------------------------- a NaN injected into a run


@pytest.fixture
def one_good_epoch(one_epoch_run):
    """The same run as the injected one, stopped cleanly after its first epoch: what last.pt must hold."""
    return load(one_epoch_run / "checkpoints" / "last.pt")


def nan_at_step(step):
    """An LpJEPA factory whose backbone's output turns NaN in the first training forward of ``step`` (1-based)."""
    calls = {"training": 0}

    def make(*args, **kwargs):
        model = LpJEPA(*args, **kwargs)

        def poison(module, inputs, output):
            if not module.training:
                return None
            calls["training"] += 1  # two forwards per step, one per view
            return output * NAN if calls["training"] == 2 * step - 1 else None

        model.backbone.register_forward_hook(poison)
        return model

    return make


@pytest.mark.parametrize("log_every", [1, 50], ids=["checked-every-step", "checked-at-the-epochs-end"])
def test_a_nan_mid_run_stops_it_and_last_pt_keeps_the_last_good_state(
    log_every, tiny_images, one_good_epoch, tmp_path, capsys, patch
):
    patch.setattr(loop, "LpJEPA", nan_at_step(6))  # 4 steps per epoch: epoch 2, batch 2
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(run_args(tiny_images, out, "--epochs", "3", "--log-every", str(log_every)))
    assert stopped.value.code == NON_FINITE_EXIT_CODE
    err = capsys.readouterr().err
    stopped_at = 6 if log_every == 1 else 8  # the next check: at once, or at the epoch's last batch
    assert f"stopped at step {stopped_at}: the loss became non-finite at step 6 (epoch 2, batch 2)" in err
    assert "loss nan" in err and "regularizer" in err and "likely causes: a learning rate too high" in err and "bad data" in err
    assert f"last good checkpoint: {out}/checkpoints/last.pt (epoch 1, step 4)" in err
    assert "Traceback" not in err

    last = load(out / "checkpoints" / "last.pt")
    assert (last["epoch"], last["batches_done"], last["global_step"]) == (1, 0, 4)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert_same_state(one_good_epoch, last, atol=0)
    assert not (out / "checkpoints" / "final.pt").exists()
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 2  # the header and epoch 1
