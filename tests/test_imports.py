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
