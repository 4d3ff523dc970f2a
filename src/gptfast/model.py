"""GPT-2 from scratch: the whole model in one file.

Hot operations (LayerNorm, the MLP's bias + GELU, attention, the loss) go through the public ops of
``kernels``, which run Triton kernels or eager PyTorch as the backend switch decides. Module names
follow GPT-2's (``transformer.wte``, ``h.{i}.attn.c_attn``, ``mlp.c_fc``, ``lm_head``...), so state
dicts map onto Hugging Face's GPT-2 with only its Conv1D transposes. That conversion, and
``GPT.from_pretrained`` / ``model.save_pretrained`` with it, is :mod:`gptfast.pretrained`'s: it
imports this module and adds the two methods to :class:`GPT`; this module knows nothing of it.
``GPT.generate`` (tensor in, prompt + new tokens out) is added the same way by :mod:`gptfast.generation`.

For generation, ``forward`` takes a :class:`KVCache`: each call appends its tokens' keys and values
to the cache and attends over everything cached, so a new token costs one position of compute.
Batches of prompts of different lengths are left-padded; ``left_pad`` masks the padding out.
"""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels, memory

# The fused MLP's module (its name is shadowed in ``kernels`` by the public op of the same name).
fused_mlp = importlib.import_module(".kernels.linear_bias_gelu", __package__)


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    embd_dropout: float = 0.0  # after token + position embeddings
    attn_dropout: float = 0.0  # on attention probabilities
    resid_dropout: float = 0.0  # on each block's attention and MLP outputs
    drop_rate: float | None = None  # when given, sets all three dropout rates
    qkv_bias: bool = True
    bias: bool = True  # biases of every other linear layer and of the LayerNorms
    tie_weights: bool = True  # the LM head shares the token-embedding matrix
    layer_norm_eps: float = 1e-5
    vocab_multiple: int = 1  # pad the embedding/head rows to a multiple of this (64 is fast on GPUs)
    fused_lm_head: bool = True  # given targets, the LM head and loss run in chunks, with no logits
    deterministic_attention: bool = True  # False: attention's dQ by atomics past its workspace limit, bits vary

    def __post_init__(self) -> None:
        for field in fields(self):  # every field has its rule in FIELD_RULES; drop_rate may be None
            value = getattr(self, field.name)
            if not (field.name == "drop_rate" and value is None):
                _check_field(field.name, value)
        if self.drop_rate is not None:
            self.embd_dropout = self.attn_dropout = self.resid_dropout = self.drop_rate
            self.drop_rate = None
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """A named configuration: GPT-2's four sizes, or "tiny"/"mini" that train on a CPU."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """From our field names, or the classic dictionary (emb_dim, n_heads, n_layers, drop_rate...).

        The classic dictionary implies a separate output head (tie_weights=False) unless it says so.
        """
        classic = {"emb_dim": "n_embd", "n_heads": "n_head", "n_layers": "n_layer"}
        d = dict(d)
        if any(key in d for key in classic):
            d.setdefault("tie_weights", False)
        d = {classic.get(key, key): value for key, value in d.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig.from_dict: unknown keys {unknown}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["drop_rate"], d["deterministic_attention"]  # a run's choice, not the model's: not saved
        return d


class ConfigFieldError(ValueError):
    """A GPTConfig field holding a value it cannot take; ``problem`` says so without naming GPTConfig,
    for a caller that names the file it came from (and may spell ``field`` as that file does)."""

    def __init__(self, field: str, value: object, expected: str):
        self.field, self.value, self.expected = field, value, expected
        self.problem = f"field {field!r} is {value!r}, expected {expected}"
        super().__init__(f"GPTConfig: {self.problem}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Each validated field: (its type test, the type's name, the value test, what a valid value is).
_SIZE = (lambda v: isinstance(v, int) and not isinstance(v, bool), "int", lambda v: v >= 1, "a positive int")
_RATE = (_is_real, "int or float", lambda v: 0.0 <= v < 1.0, "a dropout rate in [0, 1)")
_FLAG = (lambda v: isinstance(v, bool), "bool", lambda v: True, "bool")
FIELD_RULES = {
    **dict.fromkeys(("vocab_size", "context_length", "n_embd", "n_head", "n_layer", "vocab_multiple"), _SIZE),
    **dict.fromkeys(("embd_dropout", "attn_dropout", "resid_dropout", "drop_rate"), _RATE),
    **dict.fromkeys(("qkv_bias", "bias", "tie_weights", "fused_lm_head", "deterministic_attention"), _FLAG),
    "layer_norm_eps": (_is_real, "int or float", lambda v: 0 < v < math.inf, "a positive finite number"),
}


def _check_field(name: str, value: object) -> None:
    is_type, type_name, is_valid, valid = FIELD_RULES[name]
    if not is_type(value):
        raise ConfigFieldError(name, value, type_name)
    if not is_valid(value):  # NaN fails every comparison
        raise ConfigFieldError(name, value, valid)


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "mini": dict(n_layer=6, n_head=6, n_embd=384, context_length=256),  # ~30M with GPT-2's vocabulary
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, context_length=128),  # trains on a CPU in minutes
}


INIT_STD = 0.02  # GPT-2's initial weights: normal with this std, the residual projections scaled down


def initial_std(name: str, config: GPTConfig) -> float | None:
    """GPT-2's initialisation of parameter ``name``: normal with this std for a matrix (linear layers,
    embeddings), the residual projections (``c_proj``) by 1/sqrt(2 n_layer) as two per block add to the
    stream; None for a vector: a bias is zero, a LayerNorm's weight one."""
    if not name.endswith("weight") or ".ln_" in name:
        return None
    return INIT_STD / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else INIT_STD


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias, computed by ``kernels.layer_norm``; given a residual branch,
    by ``kernels.add_layer_norm``, which fuses the residual add before the norm into it."""

    def __init__(self, n: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor, branch: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """LayerNorm(x); with ``branch``, (x + branch, LayerNorm(x + branch))."""
        # Under autocast the next matmul casts y to the autocast dtype: write it in that dtype.
        device = x.device.type
        autocasting = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        out_dtype = torch.get_autocast_dtype(device) if autocasting else None
        if branch is None:
            return kernels.layer_norm(x, self.weight, self.bias, self.eps, out_dtype)
        return kernels.add_layer_norm(x, branch, self.weight, self.bias, self.eps, out_dtype)


class KVCache:
    """Keys and values of every layer, allocated once per generation.

    ``kv[layer]`` is that layer's (keys, values), each (batch, n_head, max_len, head_dim): tensors of
    their own, not views of one, so a compiled decode step updates them in place (an update through
    a view of a graph input costs a copy of the whole view per step). The first ``length`` positions
    are filled; a forward pass with the cache writes its tokens after them. Position embeddings are
    absolute, so the cache cannot slide: when it is full, :meth:`reset` it and feed the tokens to
    keep again.

    ``static=True``: ``length`` is a 0-dim int64 tensor on the cache's device instead of a Python int,
    and a forward pass writes its keys by index at that position and attends over every slot with
    the length as a mask, so a decode step has the same shapes and addresses at every position (what
    ``torch.compile`` and CUDA graphs need). The caller then tracks the length on the host itself.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 static: bool = False):
        max_len = config.context_length if max_len is None else max_len
        if not 1 <= max_len <= config.context_length:
            raise ValueError(f"KVCache: max_len {max_len} must be between 1 and the context length "
                             f"{config.context_length}")
        if batch_size < 1:
            raise ValueError(f"KVCache: batch_size must be positive, got {batch_size}")
        shape = (batch_size, config.n_head, max_len, config.head_dim)
        self.kv = [tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(2))
                   for _ in range(config.n_layer)]
        self.length: int | torch.Tensor = torch.zeros((), dtype=torch.long, device=device) if static else 0
        if static:  # compiled graphs may then write into them in place, CUDA graphs included
            for tensor in (*(t for layer in self.kv for t in layer), self.length):
                torch._dynamo.mark_static_address(tensor)

    @property
    def static(self) -> bool:
        return isinstance(self.length, torch.Tensor)

    @property
    def batch_size(self) -> int:
        return self.kv[0][0].shape[0]

    @property
    def max_len(self) -> int:
        return self.kv[0][0].shape[2]

    def reset(self) -> None:
        """Forget every cached position (the memory stays allocated)."""
        if self.static:
            self.length.zero_()
        else:
            self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config  # shared by every layer: deterministic_attention may be switched on the model
        self.n_head = config.n_head
        self.attn_dropout = config.attn_dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int | torch.Tensor = 0, left_pad: torch.Tensor | None = None) -> torch.Tensor:
        """``kv``: this layer's cached (keys, values), each (B, n_head, max_len, head_dim), ``start``
        positions filled (a 0-dim tensor for a static cache).

        ``left_pad``: (B,) leading key slots of each row that are padding, hidden from every query
        (a padding query then sees nothing and outputs zeros).
        """
        B, T, C = x.shape
        # One projection for q, k and v; the kernels take the split, transposed views by their strides.
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n_head, T, head_dim)
        key_end = None
        if isinstance(start, torch.Tensor):
            # A static cache: write the T new positions by index, then attend over every slot, those
            # from start + T on hidden by key_end: no shape depends on the position.
            slots = start + torch.arange(T, device=x.device)
            kv[0].index_copy_(2, slots, k.to(kv[0].dtype))
            kv[1].index_copy_(2, slots, v.to(kv[1].dtype))
            k, v, key_end = kv[0], kv[1], (start + T).expand(B)
        elif kv is not None:
            # Write only the T new positions; attention then reads the filled prefix as strided views.
            kv[0][:, :, start:start + T] = k
            kv[1][:, :, start:start + T] = v
            k, v = kv[0][:, :, :start + T], kv[1][:, :, :start + T]
        dropout_p = self.attn_dropout if self.training else 0.0
        # With a cache, T queries meet start + T keys: the causal mask is aligned bottom-right.
        y = kernels.flash_attention(q, k, v, causal=True, dropout_p=dropout_p, key_start=left_pad, key_end=key_end,
                                    deterministic=self.config.deterministic_attention)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_mlp.mlp_gelu_faster(x, self.c_fc.in_features):  # only where a GPU run measured it faster
            return self.resid_drop(fused_mlp.mlp_gelu(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight,
                                                      self.c_proj.bias))
        # c_fc's bias is added inside the fused bias + GELU rather than by the matmul.
        h = kernels.bias_gelu(F.linear(x, self.c_fc.weight), self.c_fc.bias)
        return self.resid_drop(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, pending: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, start: int | torch.Tensor = 0,
                left_pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream; ``pending``: the previous block's MLP output, not yet added to it.

        Returns (the stream, this block's MLP output): each residual add is left to the LayerNorm
        that reads its result next (ln_1, ln_2, then the next block's ln_1 or ln_f), which fuses it.
        """
        if pending is None:
            h = self.ln_1(x)
        else:
            x, h = self.ln_1(x, pending)
        x, h = self.ln_2(x, self.attn(h, kv, start, left_pad))
        return x, self.mlp(h)


ID_DTYPES = (torch.long, torch.int32)  # the embedding's index dtypes: other integer ids are widened to long


def _as_ids(ids: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """Token ids as the embedding takes them: int64 or int32 kept, other integer dtypes (uint8...)
    widened to int64 (a negative or too large id is then refused by its value); a float, complex or
    bool tensor refused by its dtype."""
    if not isinstance(ids, torch.Tensor) or ids.dtype in ID_DTYPES:
        return ids
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    return ids.long()


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        """The model of ``config``, refused before anything is built when its weights would not fit the
        memory of the device it is built on (``torch.get_default_device()``; meta: no limit)."""
        if not isinstance(config, GPTConfig):
            hint = ", or GPTConfig(**d) for a dictionary d" if isinstance(config, dict) else ""
            raise TypeError(f"GPT takes a GPTConfig{hint}, got {type(config).__name__}")
        memory.check_model_fits(config, torch.get_default_device(), "GPT(config)")
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, config.n_embd),
            wpe=nn.Embedding(config.context_length, config.n_embd),
            drop=nn.Dropout(config.embd_dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, config.bias, config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        self.tie_head()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=initial_std(name, config))

    def tie_head(self) -> None:
        """With ``config.tie_weights``, make the LM head's weight the token embedding's (again, after
        ``to_empty``, which allocates the two apart)."""
        if self.config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight

    @classmethod
    def unfilled(cls, config: GPTConfig) -> GPT:
        """A GPT on the CPU with its weights allocated but not set, for a caller that sets every one (a
        checkpoint's, or a seeded initialisation): the constructor's own draws would only be replaced."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        model.tie_head()
        return model

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_position_embeddings: bool = False) -> int:
        """Number of parameters, each shared tensor counted once."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if exclude_position_embeddings:
            n -= self.transformer.wpe.weight.numel()
        return n

    def new_cache(self, batch_size: int, max_len: int | None = None, static: bool = False) -> KVCache:
        """An empty key/value cache for ``batch_size`` sequences of up to ``max_len`` positions
        (default: the context length), on the model's device and in its dtype; ``static``: see KVCache."""
        weight = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len, device=weight.device, dtype=weight.dtype, static=static)

    def _check_input(self, idx: torch.Tensor, targets: torch.Tensor | None,
                     cache: KVCache | None = None, left_pad: torch.Tensor | None = None) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be a 2-D (batch, seq) tensor of token ids, got {shape}")
        B, T = idx.shape
        if not 1 <= T <= self.config.context_length:
            raise ValueError(f"sequence length {T} must be between 1 and the context length "
                             f"{self.config.context_length}")
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"the cache holds {cache.batch_size} sequences but idx has batch size {B}")
            # A static cache's length is a tensor: it is read (a host sync) only outside compiled graphs.
            filled = None if cache.static and torch.compiler.is_compiling() else int(cache.length)
            if filled is not None and filled + T > cache.max_len:
                raise ValueError(f"the cache holds {filled} of {cache.max_len} positions: no room "
                                 f"for {T} more (reset it and feed the tokens to keep)")
        if left_pad is not None and tuple(left_pad.shape) != (B,):
            raise ValueError(f"left_pad must have shape ({B},), one count per row, got {tuple(left_pad.shape)}")
        if targets is not None and tuple(targets.shape) != tuple(idx.shape):
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        if torch.compiler.is_compiling() or idx.numel() == 0:
            return  # compiled graphs skip the value checks
        if idx.device.type == "cpu":
            self._check_ids(idx, targets)
        else:
            self._assert_ids_async(idx, targets)

    def _check_ids(self, idx: torch.Tensor, targets: torch.Tensor | None) -> None:
        """Every id inside the vocabulary (targets: or -1), else a ValueError naming the first bad one; it reads
        the ids' bounds on the host, so only for ids already there (on the CPU, where that is no sync)."""
        tensors = [idx] if targets is None else [idx, targets]
        bounds = torch.stack([b.long() for t in tensors for b in t.aminmax()]).tolist()
        lo, hi = bounds[:2]
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        if targets is not None:
            lo, hi = bounds[2:]
            if lo < -1 or hi >= self.config.vocab_size:
                raise ValueError(f"target id {lo if lo < -1 else hi} is outside the vocabulary "
                                 f"[0, {self.config.vocab_size}) (-1 marks positions to ignore)")

    def _assert_ids_async(self, idx: torch.Tensor, targets: torch.Tensor | None) -> None:
        """The same check on the device, without a host sync (a training step makes none): an asynchronous
        assert, which fails the next call that synchronises, its message naming the vocabulary."""
        vocab = self.config.vocab_size
        bad = ((idx < 0) | (idx >= vocab)).any()
        if targets is not None:
            bad = bad | ((targets < -1) | (targets >= vocab)).any()
        torch._assert_async(~bad, f"a token or target id is outside the vocabulary [0, {vocab}) "
                                  "(-1 marks targets to ignore)")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, left_pad: torch.Tensor | None = None, last_only: bool = False,
                return_logits: bool = False, label_smoothing: float = 0.0, z_loss: float = 0.0
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (batch, seq, vocab_size), and given targets the mean cross-entropy, -1 ignored).

        Given targets, with ``config.fused_lm_head`` (the default), the LM head and the loss run
        together in chunks of rows (``kernels.linear_cross_entropy``): no logits tensor exists and
        None is returned in its place, unless ``return_logits`` asks for them (then unfused).
        ``cache``: idx holds only the new tokens; their keys and values are appended to the cache
        and attention covers every cached position. ``left_pad``: (batch,) number of padding
        tokens at the start of each row of the whole sequence (cached part included); padding is
        masked out of attention and each row's positions count from its first real token.
        ``last_only``: logits (batch, 1, vocab_size) of the last position only, as generation needs:
        the LM head, the widest matmul of a small model, then runs on one position, not all.
        ``label_smoothing`` and ``z_loss``: the loss's options (``kernels.cross_entropy``'s).
        """
        if last_only and targets is not None:
            raise ValueError("last_only gives the last position's logits only: it cannot compute a loss")
        idx, targets = (_as_ids(t, name) for t, name in ((idx, "idx"), (targets, "targets")))
        self._check_input(idx, targets, cache, left_pad)
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if cache is not None and cache.static and not torch.compiler.is_compiling():
            # Outside a compiled graph (the prefill) a static cache is filled as a plain one: by slices,
            # so any number of queries takes the attention kernels; compiled steps index by the tensor.
            start = int(cache.length)
        pos = start + torch.arange(T, device=idx.device)  # start: an int, or a static cache's 0-dim tensor
        if left_pad is not None:
            pos = (pos[None, :] - left_pad[:, None]).clamp(min=0)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        branch = None
        for i, block in enumerate(self.transformer.h):
            x, branch = block(x, branch, cache.kv[i] if cache is not None else None, start, left_pad)
        if cache is not None:
            cache.length += T
        if last_only:
            x, branch = x[:, -1:], branch[:, -1:]
        _, x = self.transformer.ln_f(x, branch)
        vocab = self.config.vocab_size
        # The loss takes the padded head whole: the padding columns are left out of the softmax and
        # get a zero gradient, with no copy for a slice. Targets were checked above.
        options = dict(num_classes=vocab, check_targets=False, label_smoothing=label_smoothing, z_loss=z_loss)
        if targets is not None and self.config.fused_lm_head and not return_logits:
            return None, kernels.linear_cross_entropy(x, self.lm_head.weight, targets, **options)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = kernels.cross_entropy(logits, targets, ignore_index=-1, **options)
        if self.config.padded_vocab_size != vocab:
            logits = logits[..., :vocab]
        return logits, loss
