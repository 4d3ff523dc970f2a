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
import sys
from pathlib import Path

import torch

from .checkpoint import torch_load
from .memory import check_model_fits
from .model import GPT, ConfigFieldError, GPTConfig

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_OWNER = "openai-community"
# The Conv1D layers: their weights are transposed on the way in and out.
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Buffers that old GPT-2 checkpoints store (the causal mask), not parameters: skipped on load.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# config.json's names of our GPTConfig fields, where they differ.
HF_NAMES = {"context_length": "n_positions", "embd_dropout": "embd_pdrop", "attn_dropout": "attn_pdrop",
            "resid_dropout": "resid_pdrop", "layer_norm_eps": "layer_norm_epsilon",
            "tie_weights": "tie_word_embeddings"}
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast")
LOCAL_FOLDER_HINT = (" instead of the name (a folder with config.json and model.safetensors, as "
                     "save_pretrained writes, transformers' or gptfast's)")


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
        raise ImportError(f"downloading {name!r} needs huggingface_hub (pip install huggingface_hub); "
                          f"or pass a local checkpoint directory{LOCAL_FOLDER_HINT}") from None
    try:
        return Path(snapshot_download(f"{HUB_OWNER}/{name}", allow_patterns=["config.json", "model.safetensors"]))
    except Exception as error:  # offline machines raise connection or cache-miss errors
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise ConnectionError(f"could not download {name!r} from the Hugging Face hub (no network? "
                              f"{type(error).__name__}: {first}); offline, pass a local checkpoint "
                              f"directory{LOCAL_FOLDER_HINT}") from None


def _config_field(hf: dict, name: str, kinds: tuple[type, ...], source: Path, default=None):
    """``hf[name]`` (or ``default`` when it is not required and absent), of one of ``kinds``."""
    if name not in hf:
        if default is None:
            raise ValueError(f"{source}: no {name!r} field")
        return default
    value = hf[name]
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        raise ValueError(f"{source}: field {name!r} is {value!r}, expected "
                         f"{' or '.join(k.__name__ for k in kinds)}")
    return value


def _config_from_hf(hf: object, source: Path) -> GPTConfig:
    """Our configuration for a GPT-2 config.json (``source``); a bad field, or a feature our model
    lacks, is an error naming the file."""
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: holds {type(hf).__name__}, expected a JSON object")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{source}: describes a {hf['model_type']!r} model, not GPT-2")
    sizes = {name: _config_field(hf, name, (int,), source) for name in
             ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")}
    rates = {ours: _config_field(hf, HF_NAMES[ours], (int, float), source, 0.0)
             for ours in ("embd_dropout", "attn_dropout", "resid_dropout")}
    eps = _config_field(hf, "layer_norm_epsilon", (int, float), source, 1e-5)
    tie = _config_field(hf, "tie_word_embeddings", (bool,), source, True)
    unsupported = []
    if hf.get("activation_function", "gelu_new") not in GELU_TANH:
        unsupported.append(f"activation_function={hf['activation_function']!r} (GPT-2's tanh GELU only)")
    if hf.get("n_inner") not in (None, 4 * sizes["n_embd"]):
        unsupported.append(f"n_inner={hf['n_inner']} (the MLP is 4 * n_embd wide)")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("attention scaling other than 1/sqrt(head_dim)")
    if hf.get("add_cross_attention", False):
        unsupported.append("cross-attention")
    if unsupported:
        raise ValueError(f"this GPT-2 checkpoint uses features gptfast's GPT lacks: {'; '.join(unsupported)}")
    try:
        config = GPTConfig(vocab_size=sizes["vocab_size"], context_length=sizes["n_positions"],
                           n_embd=sizes["n_embd"], n_head=sizes["n_head"], n_layer=sizes["n_layer"],
                           layer_norm_eps=float(eps), tie_weights=tie, **{k: float(v) for k, v in rates.items()})
    except ConfigFieldError as error:  # named as config.json spells it
        raise ValueError(f"{source}: field {HF_NAMES.get(error.field, error.field)!r} is {error.value!r}, "
                         f"expected {error.expected}") from None
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    check_model_fits(config, torch.device("cpu"), str(source))
    return config


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("reading and writing model.safetensors needs safetensors "
                          "(pip install safetensors, or gptfast-triton[pretrained])") from None
    return safetensors.torch


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def _shard_files(directory: Path, index: Path) -> list[Path]:
    """The files a sharded checkpoint's index names, each by its path inside ``directory``: a name that
    leaves it (``../x``, ``/etc/passwd``) is refused, while a symlink the folder holds is the folder's
    file wherever it points (the Hugging Face cache links each snapshot's shards into ``../../blobs/``)."""
    content = _json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index}: no 'weight_map' object of tensor names to file names")
    files = []
    for name in sorted(set(weight_map.values())):
        file = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{index}: weight_map names {name!r}, outside the checkpoint folder: refused")
        if not file.is_file():
            raise FileNotFoundError(f"{index}: weight_map names {name!r}, which does not exist")
        files.append(file)
    return files


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    st = _safetensors()
    try:
        return st.load_file(str(file))
    except Exception as error:  # SafetensorError, and OSError for unreadable files
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(f"{file}: not a readable safetensors file ({first})") from None


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, without running pickled code."""
    single, index, pickled = (directory / "model.safetensors", directory / "model.safetensors.index.json",
                              directory / "pytorch_model.bin")
    if single.exists() or index.exists():
        files = [single] if single.exists() else _shard_files(directory, index)
        return {k: v for f in files for k, v in _load_safetensors(f).items()}
    if pickled.exists():
        tensors = torch_load(pickled, what="PyTorch state dict")
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ValueError(f"{pickled}: not a state dict of tensor names to tensors")
        return tensors
    raise FileNotFoundError(f"{directory} holds no model.safetensors, model.safetensors.index.json "
                            "or pytorch_model.bin")


def _one_float_dtype(tensors: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    """The weights in one floating dtype: integer ones are refused, a mix is converted to float32 (said once)."""
    bad = next((k for k, v in tensors.items() if not v.is_floating_point()), None)
    if bad is not None:
        raise ValueError(f"{directory}: tensor {bad!r} is {tensors[bad].dtype}, not floating point: not GPT-2 weights")
    dtypes = {v.dtype for v in tensors.values()}
    if len(dtypes) <= 1:
        return tensors
    print(f"note: {directory} mixes {', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))} "
          "tensors: converted to float32", file=sys.stderr)
    return {k: v.float() for k, v in tensors.items()}


def from_pretrained(name_or_path: str | Path, device: torch.device | str | None = None) -> GPT:
    """Our GPT with the weights of a Hugging Face GPT-2 checkpoint (directory or hub name), in
    eval mode, in the checkpoint's dtype, with its dropout rates for fine-tuning.

    Missing, unexpected and mis-shaped tensors are an error that names them.
    """
    directory = _resolve(name_or_path)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory} has no config.json")
    config = _config_from_hf(_json(config_file), config_file)
    tensors = {}
    for name, tensor in _one_float_dtype(_read_tensors(directory), directory).items():
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
