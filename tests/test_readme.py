"""The README's and the docs pages' Python snippets run as they are, and their links stay inside the repository.

Each page's snippets run in the order they appear, in one fresh folder per page. A snippet
that starts a process group runs under ``torch.distributed.run`` with two CPU processes
(gloo), as its first line says to run it. The file the export-loading snippet reads is
written beforehand by ``lpjepa.training.export`` from a checkpoint of the CPU example's
model (resnet10t, CIFAR stem), as ``python -m lpjepa.export`` would, and copied into every
page's folder where the example's export command puts it.

No page links a local path outside the repository: links are either public web pages
(https, a named host: the paper, the official code) or relative paths that name a file or
folder that exists (relative to the page's own folder), never absolute paths, and every
``#anchor`` names a heading of the page it points to; no web address stands outside a link. The README stays short
(at most 200 lines) and links every docs page.
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from lpjepa.training.checkpoint import final_checkpoint
from lpjepa.training.export import export_checkpoint
from lpjepa.training.model import LpJEPA
from conftest import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 200
SNIPPET_TIMEOUT_S = 300
# Where the CPU example of docs/training.md exports its backbone, relative to the repository root.
EXPORTED_BACKBONE = "runs/cpu-demo/backbone.safetensors"
FENCED_CODE = re.compile(r"^```.*?^```", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", flags=re.M)  # [label]: target
# A public web page: https to a named host (not this machine, not a file).
PUBLIC_PAGE = re.compile(r"^https://(?!localhost\b|127\.|0\.0\.0\.0|\[)[a-z0-9-]+(\.[a-z0-9-]+)+(/\S*)?$", flags=re.I)


def page_name(page):
    """A short readable name for test ids: 'README.md' for the front page, 'training.md' for docs/training.md."""
    relative = page.relative_to(ROOT).as_posix()
    return relative if page.name == "README.md" else page.name


def snippets(page):
    """The ```python blocks of one Markdown page, in order."""
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def prose(text):
    """The page without its fenced and inline code, where a URL or a '#' line is not a link or a heading."""
    return INLINE_CODE.sub("", FENCED_CODE.sub("", text))


def github_slug(heading):
    """GitHub's anchor for a heading: lowercase, punctuation dropped (hyphens, underscores, spaces kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    """Every anchor GitHub makes for the headings of a page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCED_CODE.sub("", page.read_text()), flags=re.M):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        yield slug if count == 0 else f"{slug}-{count}"


def links(page):
    """Every link target of a page outside its code: inline links and reference definitions."""
    text = prose(page.read_text())
    return LINK.findall(text) + REFERENCE_LINK.findall(text)


CASES = [(page, index) for page in PAGES for index in range(len(snippets(page)))]


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """The backbone file the CPU example would have exported."""
    folder = tmp_path_factory.mktemp("backbone")

    class State:  # what final_checkpoint reads from a TrainState
        global_step = 0
        model = LpJEPA("resnet10t", "cifar")
        probes = torch.nn.Linear(1, 1)

    cfg = {"backbone": "resnet10t", "stem": "cifar", "image_size": 32, "dataset": "imagefolder"}
    path = folder / "backbone.safetensors"
    export_checkpoint(final_checkpoint(cfg, State, epoch=2), str(path))
    return path


@pytest.fixture(scope="module")
def page_folders(tmp_path_factory, backbone_file):
    """One fresh folder per page, made at its first snippet, holding a copy of the backbone file where the CPU example exports it."""
    folders = {}

    def folder_for(page):
        if page not in folders:
            folders[page] = tmp_path_factory.mktemp(page_name(page).replace("/", "-").removesuffix(".md"))
            exported = folders[page] / EXPORTED_BACKBONE
            exported.parent.mkdir(parents=True)
            shutil.copy(backbone_file, exported)
        return folders[page]

    return folder_for


def _command(path, code):
    if "init_process_group" in code:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), str(path)]
    return [sys.executable, str(path)]


def test_the_pages_have_python_snippets():
    assert snippets(README), "the README needs its usage snippet"
    assert len(CASES) >= 4, [f"{page_name(page)}-snippet{index + 1}" for page, index in CASES]


def test_the_readme_is_short_and_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md has {len(text.splitlines())} lines; move detail to docs/"
    linked = {(ROOT / target.split("#")[0]).resolve() for target in links(README) if target.split("#")[0]}
    missing = [page.relative_to(ROOT).as_posix() for page in DOCS if page.resolve() not in linked]
    assert not missing, f"README.md links none of {missing}"


def link_problems(page):
    """What is wrong with a page's links, one text each; empty when every link is allowed."""
    name = page_name(page) if page.is_relative_to(ROOT) else page.name
    bare = LINK.sub("]()", REFERENCE_LINK.sub("", prose(page.read_text())))  # the prose without its link targets
    if re.search(r"\w+://|www\.|mailto:", bare):
        yield f"{name} names a web address outside a link"
    for target in links(page):
        if PUBLIC_PAGE.match(target):
            continue  # a public web page (the paper, the official code): welcome
        if re.match(r"\w+:", target):
            yield f"{name}: {target} is neither a public https page nor a repository path"
            continue
        if target.startswith("/"):
            yield f"{name}: absolute link {target}"
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page.resolve()
        if not resolved.is_relative_to(ROOT):
            yield f"{name}: {target} leaves the repository"
        elif not resolved.exists():
            yield f"{name}: {target} does not exist"
        elif anchor and resolved.suffix != ".md":
            yield f"{name}: {target} has an anchor into a file that is not a page"
        elif anchor and anchor not in set(anchors(resolved)):
            yield f"{name}: {target}: no heading of {resolved.name} has that anchor"


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_page_links_nothing_outside_the_repository(page):
    assert list(link_problems(page)) == []


def test_the_link_check_takes_public_pages_and_refuses_local_paths_outside(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("The [paper](https://arxiv.org/abs/2602.01456) and [code](https://github.com/YilunKuang/rectified-lp-jepa).\n")
    assert list(link_problems(page)) == []
    for text, problem in (
        ("[seed](/work/shared/seed/rectified_lpjepa_minimal.md)", "absolute link"),
        ("[seed](file:///work/shared/seed/x.md)", "neither a public https page"),
        ("[local](https://localhost:8000/x)", "neither a public https page"),
        ("[up](../../outside.md)", "leaves the repository"),
        ("see https://arxiv.org/abs/2602.01456", "a web address outside a link"),
    ):
        page.write_text(text + "\n")
        assert any(problem in found for found in link_problems(page)), text


@pytest.mark.parametrize("page, index", CASES, ids=[f"{page_name(page)}-snippet{index + 1}" for page, index in CASES])
def test_snippet_runs(page, index, page_folders):
    code = snippets(page)[index]
    workdir = page_folders(page)
    path = workdir / f"snippet{index + 1}.py"
    path.write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    result = subprocess.run(_command(path, code), cwd=workdir, capture_output=True, text=True, env=env, timeout=SNIPPET_TIMEOUT_S)
    assert result.returncode == 0, (
        f"{page_name(page)} snippet {index + 1} failed:\n{code}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    )
