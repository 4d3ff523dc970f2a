"""Packaging: the wheel installs one import package, gptfast, and the checkout's root holds nothing
importable (the src layout), so no folder of ours shadows another distribution's top-level name
(PyPI has ``kernels``, Hugging Face's hub kernels, which transformers imports, and ``bench``).
Every command below runs from the checkout's root, where Python puts the working directory first
on ``sys.path``. The GPU run's scripts (``bench/gpu_run*.py``) are the checkout's, not the wheel's:
run as ``python bench/<script>.py``, with bench/ first on ``sys.path``, they have names no installed
module has."""

import importlib.machinery
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"
BUILD_SCRIPTS = {"setup"}  # setup.py: the build's own script, never imported by an installed program


def run_in(root: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=300, **kwargs)


def run_in_root(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_in(ROOT, *args, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from the root of a copy of the checkout: setuptools builds in the source tree (build/lib,
    the egg-info), and in the checkout that copy could keep a module deleted since."""
    pytest.importorskip("setuptools")
    copy, out = tmp_path_factory.mktemp("checkout") / "gptfast", tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".*", "build", "out", "runs", "data", "__pycache__",
                                                                "*.egg-info"))
    result = run_in(copy, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), ".")
    assert result.returncode == 0, result.stderr
    (found,) = out.glob("gptfast_triton-*.whl")
    return found


def test_an_import_name_is_its_path_under_src():
    origin = Path(importlib.util.find_spec("gptfast.kernels.layer_norm").origin)
    assert origin.parts[-3:] == ("gptfast", "kernels", "layer_norm.py")
    assert (SOURCE / "gptfast" / "kernels" / "layer_norm.py").is_file()


def test_the_wheel_installs_gptfast_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"gptfast"}
    assert "gptfast/kernels/layer_norm.py" in names and "gptfast/bench/report.py" in names
    assert "gptfast/kernels/flash_attention/__init__.py" in names  # a package (the ops registry finds it)
    assert "gptfast/kernels/configs/flash_attention_sm90.json" in names  # the block-size tables
    # Every package of the source tree is in the wheel (a subpackage left out of setup.py would import
    # in an editable install and fail in a real one).
    for init in SOURCE.rglob("__init__.py"):
        assert init.relative_to(SOURCE).as_posix() in names, init
    assert not any(name.startswith(("gptfast/bench/results", "gptfast/bench/gpu.sh")) for name in names)
    # The GPU run's orchestration is the checkout's scripts (bench/gpu_run*.py), not the package's.
    assert not any(name.startswith(("gptfast/bench/gpu", "gptfast/bench/triton_cache")) for name in names)


def test_an_editable_install_from_the_root_maps_src(tmp_path):
    pytest.importorskip("setuptools")
    # --target: into a folder of its own (--prefix would uninstall this environment's gptfast first).
    result = run_in_root("-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                         "--target", str(tmp_path), "-e", ".")
    assert result.returncode == 0, result.stderr
    (pth,) = tmp_path.glob("*gptfast_triton*.pth")
    assert [Path(line) for line in pth.read_text().split()] == [SOURCE]


def test_the_root_holds_nothing_importable():
    """Each name in the root is either not a module or a namespace portion, which runs no code and
    gives way to any installed package of that name."""
    for entry in ROOT.iterdir():
        name = entry.name.removesuffix(".py")
        if not name.isidentifier() or name in BUILD_SCRIPTS:
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, [str(ROOT)])
        assert spec is None or spec.origin is None, f"{entry} is importable as {name!r} from the root"


def test_the_gpu_run_scripts_shadow_no_installed_module(tmp_path):
    """bench/ is first on sys.path when its scripts run: none of their names may be an installed module's."""
    names = sorted(path.stem for path in (ROOT / "bench").glob("*.py"))
    assert "gpu_run" in names
    code = f"import importlib.util; print([n for n in {names!r} if importlib.util.find_spec(n)])"
    result = run_in(tmp_path, "-c", code, check=True)
    assert result.stdout.strip() == "[]"


def test_without_an_installed_kernels_the_root_runs_no_code_for_it():
    """`-S`: no site-packages, so no installed `kernels`; the root, first on sys.path, has none either
    (at most a folder an older checkout left, holding only __pycache__: a namespace, no code)."""
    code = ("try:\n    import kernels\nexcept ModuleNotFoundError:\n    print('no module')\n"
            "else:\n    print(kernels.__file__ or 'a namespace')\n")
    result = run_in_root("-S", "-c", code, check=True)
    assert result.stdout.strip() in ("no module", "a namespace"), result.stdout


def test_from_the_root_kernels_is_hugging_faces_and_transformers_loads_gpt2(tmp_path):
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (transformers 5.25 and newer require it)")
    where = "import kernels; print(kernels.__file__)"
    elsewhere = subprocess.run([sys.executable, "-c", where], cwd=tmp_path, capture_output=True, text=True, check=True)
    code = ("from transformers import GPT2LMHeadModel\n"
            "import gptfast.kernels, kernels\n"
            "assert kernels is not gptfast.kernels\n" + where)
    result = run_in_root("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == elsewhere.stdout  # the installed distribution's, as from any other folder


def test_gptfast_runs_from_the_root():
    result = run_in_root("-m", "gptfast", "info")
    assert result.returncode == 0, result.stderr
    assert "layer_norm:" in result.stdout


def test_one_import_name_per_module():
    """The kernels import under gptfast.kernels only, so their custom ops register once."""
    code = ("import sys, gptfast, gptfast.bench.report; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kernels', 'bench')))")
    result = run_in_root("-c", code, check=True)
    assert result.stdout.strip() == "[]"


def test_the_readme_names_the_pinned_versions():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split("\n")
                if "==" in line and not line.startswith("#"))
    (row,) = re.findall(r"^\| `constraints.txt`[^|]*\|(.*)$", (ROOT / "README.md").read_text(), re.M)
    torch, triton, transformers, kernels = (cell.strip() for cell in row.split("|")[1:5])
    assert torch.split()[0] == pins["torch"] and triton == pins["triton"]
    assert transformers == pins["transformers"] and kernels == pins["kernels"]
