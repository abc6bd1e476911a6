"""Install the ``lpjepa`` package with its Triton kernels as ``lpjepa.kernels``.

The kernels live in the top-level folder ``kernels/`` but are installed under
``lpjepa.kernels``: the PyPI distribution ``kernels`` owns the bare import name.
"""

from setuptools import setup

# Triton is not a requirement of the package: torch's CUDA builds bring the Triton they were built with,
# and without it the package runs on its torch backend (a CPU-only machine, torch's CPU build). The tests
# need it for Triton's CPU interpreter, on Linux, where Triton ships wheels.
triton_requirement = "triton; platform_system == 'Linux'"

setup(
    name="lpjepa",
    version="0.1.0",
    description="Rectified LpJEPA: the RDMReg sliced-Wasserstein loss with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["lpjepa", "lpjepa.ops", "lpjepa.training", "lpjepa.kernels"],
    package_dir={"lpjepa": "lpjepa", "lpjepa.kernels": "kernels"},
    # Lower bounds: the oldest releases the tests were run with on Python 3.11 (older ones lack what the code
    # uses: timm's pretrained_cfg_overlay in the export's loading snippet, scipy.stats.binomtest, or a wheel
    # for Python 3.11). torch stays unbounded: the kernels follow its releases.
    install_requires=[
        "torch",
        "timm>=0.9.2",
        "torchvision",
        "tqdm>=4.60",
        "numpy>=1.23.5",
        "matplotlib>=3.6.2",  # the benchmark report's plot and lpjepa.plot
        "safetensors>=0.3.1",  # lpjepa.export's files (timm installs it too)
    ],
    entry_points={
        "console_scripts": [
            "lpjepa-train = lpjepa.train:main",
            "lpjepa-eval = lpjepa.eval:main",
            "lpjepa-plot = lpjepa.plot:main",
            "lpjepa-export = lpjepa.export:main",
        ],
    },
    extras_require={
        "test": ["pytest>=7.0", "pytest-benchmark>=4.0", "scipy>=1.9.3", "mpmath>=1.1", "POT>=0.9.0", triton_requirement],
        "tensorboard": ["tensorboard"],  # TensorBoard events in the run folder; without it, metrics.csv alone
    },
)
