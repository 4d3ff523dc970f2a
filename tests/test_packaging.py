"""The wheel installs one import package, gptfast: no top-level module that another distribution
ships (PyPI has ``kernels``, Hugging Face's hub kernels, and ``bench``)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(ROOT)], check=True, capture_output=True)
    (found,) = out.glob("gptfast_triton-*.whl")
    return found


def test_the_wheel_installs_gptfast_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"gptfast"}
    assert "gptfast/kernels/flash_attention.py" in names and "gptfast/bench/report.py" in names
    assert "gptfast/kernels/configs/flash_attention_sm90.json" in names  # the block-size tables
    # Every package of the checkout is in the wheel (a subpackage left out of setup.py would import in
    # an editable install and fail in a real one).
    for init in (ROOT / "gptfast").glob("*/__init__.py"):
        assert f"gptfast/{init.parent.name}/__init__.py" in names, init
    assert not any(name.startswith(("gptfast/bench/results", "gptfast/bench/gpu.sh")) for name in names)


def test_one_import_name_per_module():
    """The kernels import under gptfast.kernels only, so their custom ops register once."""
    code = ("import sys, gptfast, gptfast.bench.report; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kernels', 'bench')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=ROOT.parent)
    assert result.stdout.strip() == "[]"


def test_the_checkout_folder_imported_as_kernels_is_an_alias():
    """From the repository root the kernels/ folder is importable as a top-level `kernels` (transformers
    probes that name for Hugging Face's hub kernels). It must not load the kernels a second time: that
    re-registered the custom operators and crashed the first ones (seen as segfaults in the test suite)."""
    code = ("import torch, kernels, gptfast.kernels as g, sys\n"
            "from transformers.utils import is_kernels_available\n"
            "assert kernels is g and is_kernels_available() is False\n"
            "assert not [m for m in sys.modules if m.startswith('kernels.')]\n"
            "g.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]))\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
