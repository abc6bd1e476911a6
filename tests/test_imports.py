"""``import lpjepa`` stays cheap: the training program's dependencies and Triton load only when used."""
import subprocess
import sys


def test_import_lpjepa_leaves_heavy_modules_unimported():
    code = (
        "import sys, lpjepa\n"
        "heavy = [m for m in ('timm', 'torchvision', 'triton', 'torch._dynamo', 'lpjepa.reference') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_reference_is_still_an_attribute_of_the_package():
    code = "import lpjepa; print(lpjepa.reference.sample_rgg.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "lpjepa.reference"


# Python run before the code under test: every import of Triton fails as it does where it is not installed.
WITHOUT_TRITON = """
import sys

class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTriton())
"""


def test_the_package_runs_without_triton():
    # A torch-only machine (torch's CPU build; Triton comes only with the test extra): the package imports,
    # computes on the torch backend without a warning, and backend='triton' names the missing install.
    code = WITHOUT_TRITON + (
        "import warnings\n"
        "import torch, lpjepa\n"
        "import lpjepa.training, lpjepa.train, lpjepa.eval, lpjepa.export, lpjepa.plot\n"
        "warnings.simplefilter('error')\n"
        "gen = torch.Generator().manual_seed(0)\n"
        "z1, z2 = torch.randn(2, 13, 6, generator=gen).unbind()\n"
        "target = lpjepa.sample_rgg((13, 6), p=1.0, mu=0.0, generator=gen)\n"
        "projections = lpjepa.reference.random_projections(8, 6, generator=gen)\n"
        "ours = lpjepa.rectified_lpjepa_loss(z1, z2, target=target, projections=projections).loss\n"
        "want = lpjepa.rectified_lpjepa_loss(z1, z2, target=target, projections=projections, backend='torch').loss\n"
        "assert torch.equal(ours, want), (ours, want)\n"
        "try:\n"
        "    lpjepa.rdmreg_loss(z1, target, projections=projections, backend='triton')\n"
        "except lpjepa.KernelUnavailable as error:\n"
        "    print(error)\n"
        "print(','.join(m for m in sys.modules if m == 'triton' or m.startswith('triton.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    refusal, imported = result.stdout.splitlines()[-2:]
    assert "No module named 'triton'" in refusal and "pip install triton" in refusal, result.stdout
    assert imported == ""
