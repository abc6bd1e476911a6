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
    assert chooser.measured[f"projection|key|{path_choice.versions_key()}"] == {"triton": 2.0, "cublas": 1.5}
    # Remembered: no timing the second time, in this process or a new one reading the file.
    timer.timed.clear()
    assert chooser.choose("projection", "key", ["triton", "cublas"], "triton", run, may_time=True) == "cublas"
    assert timer.timed == []
    assert json.loads((tmp_path / "paths.json").read_text()) == {f"projection|key|{path_choice.versions_key()}": "cublas"}
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


def test_environment_forces_or_disables(tmp_path, patch):
    chooser, timer, run, ran = chooser_and_runner(tmp_path, {"registers": 5.0, "torch_sort": 1.0})
    patch.setenv("LPJEPA_SORT_PATH", "registers")
    assert chooser.choose("sort", "k", ["registers", "torch_sort"], "torch_sort", run, may_time=True) == "registers"
    assert ran == []
    with pytest.raises(ValueError, match="LPJEPA_SORT_PATH='registers' cannot run this call"):
        chooser.choose("sort", "k", ["torch_sort"], "torch_sort", run, may_time=True)
    patch.delenv("LPJEPA_SORT_PATH")
    patch.setenv("LPJEPA_AUTOTUNE", "0")
    assert chooser.choose("sort", "k", ["registers", "torch_sort"], "registers", run, may_time=True) == "registers"
    assert ran == []


def test_a_cached_path_that_cannot_run_this_call_is_not_used(tmp_path):
    (tmp_path / "paths.json").write_text(json.dumps({f"sort|k|{path_choice.versions_key()}": "registers"}))
    chooser, timer, run, ran = chooser_and_runner(tmp_path, {"torch_sort": 1.0})
    assert chooser.choose("sort", "k", ["torch_sort"], "torch_sort", run, may_time=True) == "torch_sort"


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"projection|k": 3}', "\x00\xff{"])
def test_an_unreadable_cache_file_is_ignored_and_replaced(tmp_path, content):
    (tmp_path / "paths.json").write_text(content)
    chooser, timer, run, ran = chooser_and_runner(tmp_path, {"triton": 1.0, "cublas": 2.0})
    assert chooser.choose("projection", "k", ["triton", "cublas"], "cublas", run, may_time=True) == "triton"
    assert json.loads((tmp_path / "paths.json").read_text()) == {f"projection|k|{path_choice.versions_key()}": "triton"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paths.json", "paths.json.lock"]  # no temporary file left


def test_the_key_holds_the_torch_and_triton_versions(tmp_path, patch):
    import importlib.metadata

    key = path_choice.versions_key()
    assert f"torch={torch.__version__}" in key and f"triton={importlib.metadata.version('triton')}" in key
    # A decision measured under another torch is not reused: the path is timed again.
    other = key.replace(torch.__version__, "2.0.0")
    (tmp_path / "paths.json").write_text(json.dumps({f"projection|k|{other}": "cublas"}))
    chooser, timer, run, ran = chooser_and_runner(tmp_path, {"triton": 1.0, "cublas": 2.0})
    assert chooser.choose("projection", "k", ["triton", "cublas"], "cublas", run, may_time=True) == "triton"
    assert set(timer.timed) == {"triton", "cublas"}
    # ... and it stays in the file beside the new one, for that other torch.
    assert json.loads((tmp_path / "paths.json").read_text()) == {f"projection|k|{other}": "cublas",
                                                                 f"projection|k|{key}": "triton"}


def test_writers_keep_each_others_decisions(tmp_path):
    first, _, run1, _ = chooser_and_runner(tmp_path, {"triton": 1.0, "cublas": 2.0})
    second, _, run2, _ = chooser_and_runner(tmp_path, {"triton": 3.0, "cublas": 2.0})
    first.choose("projection", "a", ["triton", "cublas"], "cublas", run1, may_time=True)
    second._load()  # read before the first one's write of "b": its memory lacks "a" and "b"
    first.choose("projection", "b", ["triton", "cublas"], "cublas", run1, may_time=True)
    second.choose("projection", "c", ["triton", "cublas"], "triton", run2, may_time=True)
    keys = sorted(k.split("|")[1] for k in json.loads((tmp_path / "paths.json").read_text()))
    assert keys == ["a", "b", "c"]


_WRITER = """
import sys
from lpjepa.ops.path_choice import PathChooser
cache_file, name = sys.argv[1], sys.argv[2]
chooser = PathChooser(timer=lambda run: (run(), 1.0)[1], cache_file=cache_file)
for i in range(40):
    chooser.choose("sort", f"{name}-{i}", ["registers", "torch_sort"], "registers", lambda path: None, True)
"""


def test_concurrent_processes_never_corrupt_the_cache(tmp_path):
    import subprocess
    import sys

    cache_file = str(tmp_path / "paths.json")
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, cache_file, f"rank{r}"]) for r in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0] * 4
    decisions = json.loads((tmp_path / "paths.json").read_text())  # one whole file
    assert len(decisions) == 4 * 40  # every process's keys, none lost to another's write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paths.json", "paths.json.lock"]


def test_cache_location_follows_the_environment(patch, tmp_path):
    patch.setenv("LPJEPA_CACHE_DIR", str(tmp_path / "here"))
    assert path_choice.cache_path() == str(tmp_path / "here" / "paths.json")
    patch.delenv("LPJEPA_CACHE_DIR")
    patch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert path_choice.cache_path() == str(tmp_path / "xdg" / "lpjepa" / "paths.json")


def test_buckets_and_when_timing_is_allowed():
    assert [path_choice.bucket(n) for n in (1, 2, 3, 255, 256, 257)] == [1, 2, 4, 256, 256, 512]
    assert not path_choice.may_time(torch.ones(2))  # CPU tensors are never timed
    assert not path_choice.capturing_cuda_graph()  # and asking never initializes CUDA here
    assert not torch.cuda.is_initialized()


def test_nothing_is_timed_during_a_cuda_graph_capture(tmp_path, patch):
    # CUDA tensors stand in as meta ones whose device reads cuda; the capture check is the one asked.
    class OnCuda:
        device = torch.device("cuda")

    patch.setattr(torch._subclasses.fake_tensor, "is_fake", lambda t: False)
    patch.setattr(torch.cuda, "is_initialized", lambda: True)
    patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert path_choice.may_time(OnCuda())  # eager, one process, not capturing: timed
    patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not path_choice.may_time(OnCuda())
    chooser, timer, run, ran = chooser_and_runner(tmp_path, {"registers": 5.0, "torch_sort": 1.0})
    choice = chooser.choose("sort", "k", ["registers", "torch_sort"], "registers", run,
                            may_time=path_choice.may_time(OnCuda()))
    assert choice == "registers" and ran == [] and timer.timed == []


def test_the_triton_ops_ask_the_chooser_with_the_candidates_that_fit(patch):
    from lpjepa.kernels import sliced_wasserstein as kernels

    asked = []

    def record(step, key, candidates, default, run, may_time):
        asked.append((step, candidates, default))
        return default

    patch.setattr(path_choice.CHOOSER, "choose", record)
    patch.setattr(path_choice, "_ANSWERS", {})
    limit = kernels.register_sort_max_batch()
    small, large = torch.empty((1, 4, 16)), torch.empty((1, 4, limit + 1))
    assert path_choice.sort_path(small, small, False) == "registers"
    assert path_choice.sort_path(large, large, False) == "torch_sort"
    assert asked == [("sort", ["registers", "torch_sort"], "registers"), ("sort", ["torch_sort"], "torch_sort")]
    # Asked once per shape: a step at a shape already answered off CUDA pays one dict look-up.
    assert path_choice.sort_path(small, small, False) == "registers" and len(asked) == 2


def test_a_forcing_variable_set_mid_run_reaches_a_shape_already_answered(patch):
    patch.setattr(path_choice, "_ANSWERS", {})
    proj = torch.empty((1, 4, 16))
    assert path_choice.sort_path(proj, proj, False) == "registers"
    patch.setenv("LPJEPA_SORT_PATH", "torch_sort")
    assert path_choice.sort_path(proj, proj, False) == "torch_sort"
    patch.delenv("LPJEPA_SORT_PATH")
    assert path_choice.sort_path(proj, proj, False) == "registers"


@pytest.mark.parametrize("layout", ["cpython", "without _data"])
def test_the_environment_reader_reads_what_os_environ_holds(patch, layout):
    name = "LPJEPA_TEST_READER"
    if layout == "without _data":  # another Python's os.environ: the reader falls back to os.environ.get
        patch.setattr(path_choice.os, "environ", dict(path_choice.os.environ))
    read = path_choice.environment_reader(name)
    assert read() is None
    for value in ("registers", "", "torch_sort"):
        patch.setenv(name, value)
        assert read() == value == path_choice.os.environ.get(name)
    patch.delenv(name)
    assert read() is None
