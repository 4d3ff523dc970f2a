"""Test set-up: kernels run under the Triton interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is imported, so it is set here, before any test module
imports ``kernels``. On a CUDA machine the real kernels run, on the GPU (``on_kernel_device``).
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh torch.compile cache per test session: a cache left by an older checkout can hold code
# compiled against an older signature of our custom operators.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptfast-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

# The GPT-2 BPE ranks for offline machines (CI keeps them in ../shared/data next to the repository).
_LOCAL_RANKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2.tiktoken"
if _LOCAL_RANKS.exists():
    os.environ.setdefault("GPTFAST_TIKTOKEN_FILE", str(_LOCAL_RANKS))

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from gptfast import kernels  # noqa: E402

# Hypothesis draws the same examples on every run (seeded by each test's name), so a CI run cannot
# fail on an example the previous run never met; new examples come from editing the strategies.
settings.register_profile("gptfast", derandomize=True)
settings.load_profile("gptfast")


@pytest.fixture(scope="module")
def on_kernel_device():
    """Tensors made without a device go where the Triton kernels really run: the GPU when there is
    one; on a machine without one they stay on the CPU, where the interpreter runs the kernels.
    Kernel test modules use it through ``pytestmark``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    previous = torch.get_default_device()
    torch.set_default_device(device)
    yield device
    torch.set_default_device(previous)


@pytest.fixture
def interpreter_bf16_dot(monkeypatch):
    """Under the interpreter, ``tl.dot`` multiplies bfloat16 operands' raw bits (it stores them as
    uint16). This widens them to float32 first, which is exact (a GPU's bf16 dot also multiplies
    exactly and accumulates in float32), so bf16 kernels can be checked on a CPU. Nothing on a GPU."""
    if not kernels.backend.TRITON_INTERPRET:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def widened(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16  # bf16 is the top half of a float32
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    create_dot = interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, *args: create_dot(self, widened(a), widened(b), *args))


@pytest.fixture
def interpreter_bf16_rounding(monkeypatch):
    """Under the interpreter, a float32 -> bfloat16 conversion (``x.to(tl.bfloat16)``, a store to a
    bf16 pointer) drops the low 16 bits (and mangles subnormals); a GPU rounds to nearest, ties to
    even, as torch's ``.to(torch.bfloat16)`` does. This makes the interpreter round too, so that a bf16
    kernel test measures the kernel's error and not the interpreter's. Nothing on a GPU."""
    if not kernels.backend.TRITON_INTERPRET:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def rounded(values):
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)  # room to carry
        top = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # a tie rounds to the even half
        return np.where(np.isnan(values), np.uint16(0x7FC0), top)  # the carry would turn some NaNs into inf

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(rounded(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast)


@pytest.fixture(autouse=True)
def _restore_backend():
    """Each test starts on the "auto" backend and cannot leak a backend change into the next."""
    previous = kernels.get_backend()
    kernels.set_backend("auto")
    yield
    kernels.set_backend(previous)


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmark suite (tests using pytest-benchmark's `benchmark` fixture), "
                     "full sizes on a GPU and small ones on a CPU; plain pytest skips it")


def pytest_collection_modifyitems(config, items):
    """Without --benchmark, skip every test that uses the `benchmark` fixture."""
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="a benchmark: run it with pytest --benchmark")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread, and far faster than on several on a busy machine: the
    training test modules use it for all their tests (``pytestmark``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The embedded corpus, char-level, prepared once per module."""
    from gptfast.data import prepare

    out = tmp_path_factory.mktemp("data")
    prepare(None, out)
    return out
