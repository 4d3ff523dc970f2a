"""The backend switch: each way of setting it, explain(), and "triton" refusing what it cannot run."""

import subprocess
import sys

import pytest
import torch

import gptfast
from gptfast import kernels
from gptfast.kernels import backend


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
    result = subprocess.run([sys.executable, "-c", "import gptfast.kernels"], env={"GPTFAST_BACKEND": "fast"},
                            capture_output=True, text=True)
    assert result.returncode != 0 and "unknown backend 'fast'" in result.stderr


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
