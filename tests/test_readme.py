"""The README's Python snippets run as they are, in the order they appear, in one fresh folder.

A snippet that starts a process group runs under ``torch.distributed.run`` with two CPU
processes (gloo), as its first line says to run it. The file the export-loading snippet
reads is written beforehand by ``lpjepa.training.export`` from a checkpoint of the
CPU example's model (resnet10t, CIFAR stem), as ``python -m lpjepa.export`` would.
The README must link nothing outside the repository.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from lpjepa.training.checkpoint import final_checkpoint
from lpjepa.training.export import export_checkpoint
from lpjepa.training.model import LpJEPA
from conftest import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
SNIPPET_TIMEOUT_S = 300


def _command(path, code):
    if "init_process_group" in code:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), str(path)]
    return [sys.executable, str(path)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The folder the snippets run in, holding the backbone file the CPU example would have exported."""
    folder = tmp_path_factory.mktemp("readme")

    class State:  # what final_checkpoint reads from a TrainState
        global_step = 0
        model = LpJEPA("resnet10t", "cifar")
        probes = torch.nn.Linear(1, 1)

    cfg = {"backbone": "resnet10t", "stem": "cifar", "image_size": 32, "dataset": "imagefolder"}
    export_checkpoint(final_checkpoint(cfg, State, epoch=2), str(folder / "backbone.safetensors"))
    return folder


def test_the_readme_has_python_snippets_and_links_nothing_outside():
    assert len(SNIPPETS) >= 4
    for target in re.findall(r"\]\(([^)]+)\)", README):
        assert target.startswith("#") or (ROOT / target).exists(), target
        assert not target.startswith(("..", "/")), target


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=[f"snippet{i + 1}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(index, workdir):
    code = SNIPPETS[index]
    path = workdir / f"snippet{index + 1}.py"
    path.write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    result = subprocess.run(_command(path, code), cwd=workdir, capture_output=True, text=True, env=env, timeout=SNIPPET_TIMEOUT_S)
    assert result.returncode == 0, f"README snippet {index + 1} failed:\n{code}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
