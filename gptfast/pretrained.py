"""Hugging Face GPT-2 checkpoints in and out of our GPT.

A checkpoint is a directory with ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or the older ``pytorch_model.bin``). Module names already match
GPT-2's; the one conversion is the layout of GPT-2's ``Conv1D`` layers, which store their weight as
(in_features, out_features), the transpose of ``nn.Linear``. Tensors are read with safetensors or
``torch.load(weights_only=True)``, so no pickled code runs.

This module owns the conversion; the model does not import it. It gives :class:`~gptfast.model.GPT`
its Hugging Face methods, ``GPT.from_pretrained(name_or_path)`` and ``model.save_pretrained(path)``
(the functions below), when it is imported, which ``import gptfast`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .model import GPT, GPTConfig

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_OWNER = "openai-community"
# The Conv1D layers: their weights are transposed on the way in and out.
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Buffers that old GPT-2 checkpoints store (the causal mask), not parameters: skipped on load.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast")


def _resolve(name_or_path: str | Path) -> Path:
    """The local checkpoint directory: the path itself, or a hub download for GPT-2's four names."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path).removeprefix(f"{HUB_OWNER}/")
    if name not in HUB_NAMES:
        raise FileNotFoundError(f"{str(name_or_path)!r} is neither a checkpoint directory nor one of "
                                f"{', '.join(HUB_NAMES)}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError(f"downloading {name!r} needs huggingface_hub (pip install huggingface_hub); "
                           "or pass a local checkpoint directory") from None
    try:
        return Path(snapshot_download(f"{HUB_OWNER}/{name}", allow_patterns=["config.json", "model.safetensors"]))
    except Exception as error:  # offline machines raise connection or cache-miss errors
        raise RuntimeError(f"could not download {name!r} from the Hugging Face hub ({type(error).__name__}: "
                           f"{error}); without a network, pass a local checkpoint directory") from error


def _config_from_hf(hf: dict) -> GPTConfig:
    """Our configuration for a GPT-2 config.json; features our model lacks are an error."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json describes a {hf['model_type']!r} model, not GPT-2")
    unsupported = []
    if hf.get("activation_function", "gelu_new") not in GELU_TANH:
        unsupported.append(f"activation_function={hf['activation_function']!r} (GPT-2's tanh GELU only)")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        unsupported.append(f"n_inner={hf['n_inner']} (the MLP is 4 * n_embd wide)")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("attention scaling other than 1/sqrt(head_dim)")
    if hf.get("add_cross_attention", False):
        unsupported.append("cross-attention")
    if unsupported:
        raise ValueError(f"this GPT-2 checkpoint uses features gptfast's GPT lacks: {'; '.join(unsupported)}")
    return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf["n_positions"], n_embd=hf["n_embd"],
                     n_head=hf["n_head"], n_layer=hf["n_layer"],
                     layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                     tie_weights=hf.get("tie_word_embeddings", True), embd_dropout=hf.get("embd_pdrop", 0.0),
                     attn_dropout=hf.get("attn_pdrop", 0.0), resid_dropout=hf.get("resid_pdrop", 0.0))


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise RuntimeError("reading and writing model.safetensors needs safetensors "
                           "(pip install safetensors, or gptfast-triton[pretrained])") from None
    return safetensors.torch


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, without running pickled code."""
    single, index, pickled = (directory / "model.safetensors", directory / "model.safetensors.index.json",
                              directory / "pytorch_model.bin")
    if single.exists() or index.exists():
        files = [single] if single.exists() else sorted(
            {directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        return {k: v for f in files for k, v in _safetensors().load_file(str(f)).items()}
    if pickled.exists():
        return torch.load(pickled, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} holds no model.safetensors, model.safetensors.index.json "
                            "or pytorch_model.bin")


def from_pretrained(name_or_path: str | Path, device: torch.device | str | None = None) -> GPT:
    """Our GPT with the weights of a Hugging Face GPT-2 checkpoint (directory or hub name), in
    eval mode, in the checkpoint's dtype, with its dropout rates for fine-tuning.

    Missing, unexpected and mis-shaped tensors are an error that names them.
    """
    directory = _resolve(name_or_path)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory} has no config.json")
    config = _config_from_hf(json.loads(config_file.read_text()))
    tensors = {}
    for name, tensor in _read_tensors(directory).items():
        # GPT2Model checkpoints (the original gpt2 upload) name the body without "transformer.".
        name = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if not name.endswith(IGNORED_SUFFIXES):
            tensors[name] = tensor.t() if name.endswith(CONV1D_SUFFIXES) else tensor
    if config.tie_weights:
        tensors.setdefault("lm_head.weight", tensors.get("transformer.wte.weight"))

    with torch.device("meta"):
        model = GPT(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - {k for k, v in tensors.items() if v is not None})
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [f"{k}: {tuple(tensors[k].shape)} in the checkpoint, {tuple(expected[k].shape)} expected"
                 for k in sorted(set(expected) & set(tensors)) if tensors[k] is not None
                 and tensors[k].shape != expected[k].shape]
    problems = [f"missing tensors: {missing}" if missing else "",
                f"unexpected tensors: {unexpected}" if unexpected else "",
                f"mis-shaped tensors: {misshaped}" if misshaped else ""]
    if any(problems):
        raise ValueError(f"{directory} does not fit a GPT-2 with {config.n_layer} layers, n_embd "
                         f"{config.n_embd}, vocab {config.vocab_size}: " + "; ".join(p for p in problems if p))
    # The meta model takes the loaded tensors as its parameters: no second copy of the weights.
    model.load_state_dict({k: v.contiguous() for k, v in tensors.items()}, strict=True, assign=True)
    if config.tie_weights:
        model.lm_head.weight = model.transformer.wte.weight
    return (model.to(device) if device is not None else model).eval()


def save_pretrained(model: GPT, path: str | Path) -> None:
    """Write ``model`` as a Hugging Face GPT-2 checkpoint (config.json + model.safetensors)."""
    config = model.config
    if not (config.qkv_bias and config.bias):
        raise ValueError("GPT-2 checkpoints have every bias: a model with qkv_bias=False or bias=False "
                         "cannot be saved as one")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_weights:
            continue  # transformers ties the head to transformer.wte.weight itself
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: config.vocab_size]  # drop rows padded for vocab_multiple
        tensor = tensor.t() if name.endswith(CONV1D_SUFFIXES) else tensor
        tensors[name] = tensor.detach().to("cpu").contiguous()
    _safetensors().save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf_config = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
        "n_positions": config.context_length, "n_embd": config.n_embd, "n_layer": config.n_layer,
        "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps, "tie_word_embeddings": config.tie_weights,
        "embd_pdrop": config.embd_dropout, "attn_pdrop": config.attn_dropout,
        "resid_pdrop": config.resid_dropout, "scale_attn_weights": True,
        "dtype": str(tensors["transformer.wte.weight"].dtype).removeprefix("torch."),
    }
    if config.vocab_size == 50257:  # GPT-2's own vocabulary: <|endoftext|> begins and ends texts
        hf_config.update(bos_token_id=50256, eos_token_id=50256)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


# Attached here rather than written in model.py, so that the dependency runs one way: pretrained -> model.
GPT.from_pretrained = staticmethod(from_pretrained)
GPT.save_pretrained = save_pretrained
