"""The self-tuning choice of the Triton backend's paths, with a fake timer on the CPU."""
import json

import pytest
import torch

from lpjepa.ops import path_choice
from lpjepa.ops.path_choice import PathChooser


class FakeTimer:
    """Times each path at a fixed number of milliseconds, and counts what it timed."""

    def __init__(self, ms):
        self.ms = ms
        self.timed = []

    def __call__(self, run):
        run()
        self.timed.append(self.current)
        return self.ms[self.current]


def chooser_and_runner(tmp_path, ms):
    timer = FakeTimer(ms)
    chooser = PathChooser(timer=timer, cache_file=str(tmp_path / "paths.json"))
    ran = []

    def run(path):
        timer.current = path
        ran.append(path)

    return chooser, timer, run, ran


def test_times_every_candidate_once_and_keeps_the_fastest(tmp_path):
    chooser, timer, run, ran = chooser_and_runner(tmp_path, {"triton": 2.0, "cublas": 1.5})
    assert chooser.choose("projection", "key", ["triton", "cublas"], "triton", run, may_time=True) == "cublas"
    assert set(timer.timed) == {"triton", "cublas"}
    assert chooser.measured["projection|key"] == {"triton": 2.0, "cublas": 1.5}
    # Remembered: no timing the second time, in this process or a new one reading the file.
    timer.timed.clear()
    assert chooser.choose("projection", "key", ["triton", "cublas"], "triton", run, may_time=True) == "cublas"
    assert timer.timed == []
    assert json.loads((tmp_path / "paths.json").read_text()) == {"projection|key": "cublas"}
    fresh, fresh_timer, run2, _ = chooser_and_runner(tmp_path, {"triton": 0.1, "cublas": 9.0})
    assert fresh.choose("projection", "key", ["triton", "cublas"], "triton", run2, may_time=True) == "cublas"
    assert fresh_timer.timed == []


def test_no_timing_when_not_allowed_uses_the_default(tmp_path):
    chooser, timer, run, ran = chooser_and_runner(tmp_path, {"registers": 5.0, "torch_sort": 1.0})
    assert chooser.choose("sort", "k", ["registers", "torch_sort"], "registers", run, may_time=False) == "registers"
    assert ran == [] and not (tmp_path / "paths.json").exists()


def test_one_candidate_is_not_timed(tmp_path):
    chooser, timer, run, ran = chooser_and_runner(tmp_path, {"torch_sort": 1.0})
    assert chooser.choose("sort", "k", ["torch_sort"], "torch_sort", run, may_time=True) == "torch_sort"
    assert ran == []


def test_environment_forces_or_disables(tmp_path, monkeypatch):
    chooser, timer, run, ran = chooser_and_runner(tmp_path, {"registers": 5.0, "torch_sort": 1.0})
    monkeypatch.setenv("LPJEPA_SORT_PATH", "registers")
    assert chooser.choose("sort", "k", ["registers", "torch_sort"], "torch_sort", run, may_time=True) == "registers"
    assert ran == []
    with pytest.raises(ValueError, match="LPJEPA_SORT_PATH='registers' cannot run this call"):
        chooser.choose("sort", "k", ["torch_sort"], "torch_sort", run, may_time=True)
    monkeypatch.delenv("LPJEPA_SORT_PATH")
    monkeypatch.setenv("LPJEPA_AUTOTUNE", "0")
    assert chooser.choose("sort", "k", ["registers", "torch_sort"], "registers", run, may_time=True) == "registers"
    assert ran == []


def test_a_cached_path_that_cannot_run_this_call_is_not_used(tmp_path):
    (tmp_path / "paths.json").write_text(json.dumps({"sort|k": "registers"}))
    chooser, timer, run, ran = chooser_and_runner(tmp_path, {"torch_sort": 1.0})
    assert chooser.choose("sort", "k", ["torch_sort"], "torch_sort", run, may_time=True) == "torch_sort"


def test_an_unreadable_cache_file_is_ignored(tmp_path):
    (tmp_path / "paths.json").write_text("not json")
    chooser, timer, run, ran = chooser_and_runner(tmp_path, {"triton": 1.0, "cublas": 2.0})
    assert chooser.choose("projection", "k", ["triton", "cublas"], "cublas", run, may_time=True) == "triton"


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LPJEPA_CACHE_DIR", str(tmp_path / "here"))
    assert path_choice.cache_path() == str(tmp_path / "here" / "paths.json")
    monkeypatch.delenv("LPJEPA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert path_choice.cache_path() == str(tmp_path / "xdg" / "lpjepa" / "paths.json")


def test_buckets_and_when_timing_is_allowed():
    assert [path_choice.bucket(n) for n in (1, 2, 3, 255, 256, 257)] == [1, 2, 4, 256, 256, 512]
    assert not path_choice.may_time(torch.ones(2))  # CPU tensors are never timed


def test_the_triton_ops_ask_the_chooser_with_the_candidates_that_fit(monkeypatch):
    from lpjepa.kernels import sliced_wasserstein as kernels
    from lpjepa.ops import sliced_wasserstein_triton as triton_ops

    asked = []

    def record(step, key, candidates, default, run, may_time):
        asked.append((step, candidates, default))
        return default

    monkeypatch.setattr(triton_ops.CHOOSER, "choose", record)
    limit = kernels.register_sort_max_batch()
    small, large = torch.empty((1, 4, 16)), torch.empty((1, 4, limit + 1))
    assert triton_ops.sort_path(small, small, False) == "registers"
    assert triton_ops.sort_path(large, large, False) == "torch_sort"
    assert asked == [("sort", ["registers", "torch_sort"], "registers"), ("sort", ["torch_sort"], "torch_sort")]
