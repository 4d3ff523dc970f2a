"""The backend switch: each way of setting it, explain(), "triton" refusing what it cannot run, and
`gptfast info`'s report of it (and of its --vocab-size)."""

import subprocess
import sys

import pytest
import torch

import gptfast
from gptfast import cli, kernels
from gptfast.cli import main
from gptfast.kernels import backend
from gptfast.kernels.registry import SPECS
from gptfast.model import GPTConfig


def test_set_get_and_context_manager():
    assert gptfast.get_backend() == "auto"
    gptfast.set_backend("torch")
    assert kernels.get_backend() == "torch"
    with gptfast.use_backend("triton"):
        assert kernels.get_backend() == "triton"
    assert kernels.get_backend() == "torch"
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        gptfast.set_backend("cuda")


def test_context_manager_restores_after_error():
    with pytest.raises(RuntimeError):
        with gptfast.use_backend("torch"):
            raise RuntimeError
    assert kernels.get_backend() == "auto"


@pytest.mark.parametrize("value, expected", [("torch", "torch"), ("TRITON", "triton"), ("", "auto")])
def test_environment_variable(value, expected):
    code = "from gptfast import kernels; print(kernels.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], env={"GPTFAST_BACKEND": value, "PATH": ""},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == expected


def test_bad_environment_variable():
    """Refused when the backend is first needed (not at import: `gptfast --version` must still work)."""
    code = "import gptfast.kernels; gptfast.kernels.get_backend()"
    result = subprocess.run([sys.executable, "-c", code], env={"GPTFAST_BACKEND": "fast"},
                            capture_output=True, text=True)
    assert result.returncode != 0 and "unknown backend 'fast'" in result.stderr


def test_bad_environment_variable_is_one_line_and_version_help_still_work(monkeypatch, capsys):
    monkeypatch.setattr(backend, "_ENVIRONMENT", "bogus")
    monkeypatch.setattr(backend, "_backend", None)
    for argv in (["--version"], ["--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
    capsys.readouterr()
    assert main(["info"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "gptfast info: error: GPTFAST_BACKEND: unknown backend 'bogus': choose one of auto, triton, torch"]
    with kernels.use_backend("torch"):  # a backend set in code (or by --backend) is not refused for it
        assert kernels.get_backend() == "torch"


def test_info_says_triton_is_refused_where_it_cannot_run(monkeypatch, capsys):
    """On a machine without a GPU (or the interpreter) info reports what training does: the "triton"
    backend refuses every op (it used to list them as running on torch)."""
    monkeypatch.setattr(backend, "TRITON_INTERPRET", False)
    with kernels.use_backend("triton"):
        route = kernels.explain("layer_norm", torch.randn(4, 8), None, None)
        assert route.refused and str(route).startswith("layer_norm: refused, the 'triton' backend cannot run it")
        with pytest.raises(kernels.BackendError, match="CUDA"):
            kernels.layer_norm(torch.randn(4, 8), None, None)
        report = cli._backend_report("cpu").splitlines()
    assert [line.split(":")[0].strip() for line in report[:-1]] == list(SPECS)
    assert all(": refused, the 'triton' backend cannot run it (tensors on cpu" in line for line in report[:-1])
    assert "stop at the first refused op" in report[-1]
    for name in ("auto", "torch"):
        with kernels.use_backend(name):
            route = kernels.explain("layer_norm", torch.randn(4, 8), None, None)
        assert not route.refused and str(route).startswith("layer_norm: torch (")


@pytest.mark.parametrize("argv", [["--vocab-size", "99999999999999999999999999"],
                                  ["--vocab-size", "10000000000", "--forward", "tiny"]])
def test_info_refuses_an_absurd_vocabulary_before_building(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(["info", *argv])
    assert done.value.code == 2
    assert "argument --vocab-size: must be at most 4,294,967,296 (token ids are stored as uint32)" in \
        capsys.readouterr().err


def test_info_forward_refuses_a_model_over_the_memory():
    config = GPTConfig.from_preset("tiny", vocab_size=2**32)
    message = "--forward tiny with a vocabulary of 4,294,967,296: .* more than this machine"
    with pytest.raises(ValueError, match=message):
        cli._check_forward_fits("tiny", config, "cpu")


def test_torch_backend_always_eager():
    x = torch.randn(4, 8)
    with kernels.use_backend("torch"):
        route = kernels.explain("layer_norm", x, None, None)
    assert not route.use_triton and "torch" in route.reason


def test_auto_is_eager_on_cpu():
    route = kernels.explain("bias_gelu", torch.randn(4, 8), torch.randn(8))
    assert not route.use_triton and "CUDA" in route.reason


def test_explain_unknown_op():
    with pytest.raises(ValueError, match="unknown operation"):
        kernels.explain("softmax", torch.randn(2))


def test_triton_refuses_devices_it_cannot_run(monkeypatch):
    monkeypatch.setattr(backend, "TRITON_INTERPRET", False)
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="CUDA"):
        kernels.layer_norm(torch.randn(4, 8), None, None)


def test_triton_refuses_when_triton_missing(monkeypatch):
    monkeypatch.setattr(backend, "HAS_TRITON", False)
    q = torch.randn(1, 1, 4, 16)
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="not installed"):
        kernels.flash_attention(q, q, q)
    assert kernels.explain("flash_attention", q, q, q).use_triton is False


def test_imports_and_runs_without_triton():
    """With triton unimportable, everything imports and the model runs eagerly on "auto"."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, gptfast\n"
            "m = gptfast.GPT(gptfast.GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, context_length=8))\n"
            "logits, loss = m(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))\n"
            "loss.backward(); print(kernels_path := gptfast.explain('layer_norm', torch.ones(2, 2), None, None))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"TRITON_INTERPRET": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
