"""Text generation: greedy decoding or sampling (temperature, top-k, top-p) for batches of prompts.

Two forms: :func:`generate` takes a list of prompts (lists of token ids, lengths may differ) and
returns each prompt's new tokens; given a (batch, seq) tensor instead, it returns a tensor with the
prompt and the new tokens, as ``model.generate(idx, max_new_tokens)`` (nanoGPT's contract) does.

Prompts of different lengths are left-padded into one batch; the model masks the padding and
numbers each row's positions from its first real token, so every row gets the tokens it would get
alone. With ``use_cache=True`` a :class:`~gptfast.model.KVCache` is allocated once and each step
feeds only the newest token; with ``use_cache=False`` each step re-runs the model on the whole
window. Both see the same windows, so greedy decoding gives the same tokens either way.

The window: prompts longer than the context are cropped to their last ``context_length`` tokens
(with a warning). When a sequence outgrows the context, the oldest quarter of the window is dropped
(at least one token, and at least one kept) and the cache is recomputed from the rest: position
embeddings are absolute, so cached keys cannot simply shift. The batch slides as one, so past the
context a row's tokens can differ from those it gets alone.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .model import GPT, KVCache

Prompts = Sequence[Sequence[int]]  # token ids: lists, tuples or numpy arrays of Python or numpy integers
Step = list[int | None]  # one step: each prompt's new token, None for a prompt that has stopped

DEFAULT_TEMPERATURE = 1.0  # of generate, stream, GPT.generate and `gptfast generate`: the model's own distribution


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the ``top_k`` largest and outside the nucleus of ``top_p``.

    The nucleus is the smallest set of most likely tokens whose probabilities sum to at least
    ``top_p``; the most likely token always stays. ``logits``: (batch, vocab).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # A token leaves the nucleus when the more likely tokens before it already reach top_p.
        outside = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def pick_tokens(logits: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` (batch, vocab): the argmax when temperature is 0, else a sample.

    Logits are tempered in float64 after subtracting each row's maximum, so a temperature so small
    that logits / temperature overflows (1e-45) leaves the maximum at 0 and the rest at -inf: the
    sample is then the argmax, as greedy decoding gives, rather than NaN probabilities.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.double()
    tempered = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    probs = filter_logits(tempered, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _is_integer(value) -> bool:
    """A Python or numpy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _checked_prompts(model: GPT, prompts: Prompts | torch.Tensor) -> list[list[int]]:
    """The prompts as lists of Python ints, each checked: non-empty, integer ids inside the vocabulary."""
    if not isinstance(model, GPT):
        raise TypeError(f"generate needs a gptfast GPT model, got {type(model).__name__} "
                        "(use gptfast.patch for other models)")
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or 0 in prompts.shape:
            raise ValueError(f"a tensor of prompts must be 2-D (batch, seq) with at least one token, "
                             f"got shape {tuple(prompts.shape)}")
        if prompts.dtype.is_floating_point or prompts.dtype.is_complex or prompts.dtype == torch.bool:
            raise ValueError(f"a tensor of prompts must hold integer token ids, got dtype {prompts.dtype}")
        prompts = prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists, or a (batch, seq) tensor")
    vocab = model.config.vocab_size
    checked = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__") or \
                not all(_is_integer(t) for t in prompt):
            raise ValueError(f"prompt {i} must be a list of int token ids, got {type(prompt).__name__}")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary [0, {vocab})")
        checked.append(prompt)
    return checked


def _check_options(model: GPT, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   eos_token_id: int | None) -> None:
    vocab = model.config.vocab_size
    if not _is_integer(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (not _is_integer(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if eos_token_id is not None and (not _is_integer(eos_token_id) or not 0 <= eos_token_id < vocab):
        raise ValueError(f"eos_token_id {eos_token_id!r} is not a token id of the vocabulary [0, {vocab})")


def _left_padded(prompts: list[list[int]], context_length: int, device: torch.device
                 ) -> tuple[torch.Tensor, list[int]]:
    """The prompts cropped to the context, as one left-padded (batch, longest) tensor, and the
    number of padding tokens per row (kept on the host: deciding on padding needs no sync)."""
    cropped = [p[-context_length:] for p in prompts]
    width = max(len(p) for p in cropped)
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in cropped], device=device)
    return tokens, [width - len(p) for p in cropped]


def stream(model: GPT, prompts: Prompts | torch.Tensor, max_new_tokens: int, *,
           temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, eos_token_id: int | None = None, use_cache: bool = True) -> Iterator[Step]:
    """An iterator over the steps: each prompt's new token, or None for a prompt that has stopped.

    Arguments as for :func:`generate`, checked here, at the call, before any step runs. The model
    is in eval mode while the iterator runs.
    """
    checked = _checked_prompts(model, prompts)
    _check_options(model, max_new_tokens, temperature, top_k, top_p, eos_token_id)
    context = model.config.context_length
    longer = [i for i, prompt in enumerate(checked) if len(prompt) > context]
    if longer:
        warnings.warn(f"prompts {longer} are longer than the context length {context}: each keeps its last tokens",
                      stacklevel=3)
    top_k = None if top_k is None else int(top_k)
    eos_token_id = None if eos_token_id is None else int(eos_token_id)
    return _steps(model, checked, int(max_new_tokens), temperature, top_k, top_p, seed, eos_token_id, use_cache)


def _steps(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int | None,
           top_p: float | None, seed: int | None, eos_token_id: int | None, use_cache: bool) -> Iterator[Step]:
    context = model.config.context_length
    device = model.transformer.wte.weight.device
    tokens, pads = _left_padded(prompts, context, device)
    left_pad = torch.tensor(pads, device=device) if any(pads) else None
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    # A full window drops its oldest quarter, at least one token, and keeps at least one (context 1).
    keep = max(1, context - max(1, context // 4))
    cache = model.new_cache(len(prompts), min(context, tokens.shape[1] + max_new_tokens)) if use_cache else None
    stopped = [False] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if tokens.shape[1] > context:
                dropped = tokens.shape[1] - keep
                tokens, pads = tokens[:, dropped:], [max(0, p - dropped) for p in pads]
                left_pad = torch.tensor(pads, device=device) if any(pads) else None
                if cache is not None:
                    cache.reset()
            logits = _next_token_logits(model, tokens, left_pad, cache)
            new = pick_tokens(logits, temperature, top_k, top_p, generator)
            tokens = torch.cat([tokens, new[:, None]], dim=1)
            step = []
            for i, token in enumerate(new.tolist()):
                step.append(None if stopped[i] else token)
                stopped[i] = stopped[i] or token == eos_token_id
            yield step
            if all(stopped):
                return
    finally:
        model.train(was_training)


@torch.no_grad()
def _next_token_logits(model: GPT, tokens: torch.Tensor, left_pad: torch.Tensor | None,
                       cache: KVCache | None) -> torch.Tensor:
    """Logits (batch, vocab) for the token after ``tokens``; with a cache, only uncached tokens run."""
    if cache is None:
        logits, _ = model(tokens, left_pad=left_pad, last_only=True)
    else:
        logits, _ = model(tokens[:, cache.length:], cache=cache, left_pad=left_pad, last_only=True)
    return logits[:, -1, :]


def collect(steps: Iterable[Step], batch_size: int, on_step: Callable[[Step], None] | None = None
            ) -> list[list[int]]:
    """Each prompt's new tokens from the steps of :func:`stream`, passing every step to ``on_step``."""
    outputs: list[list[int]] = [[] for _ in range(batch_size)]
    for step in steps:
        if on_step is not None:
            on_step(step)
        for output, token in zip(outputs, step):
            if token is not None:
                output.append(token)
    return outputs


def generate(model: GPT, prompts: Prompts | torch.Tensor, max_new_tokens: int, *,
             temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_token_id: int | None = None, use_cache: bool = True,
             on_step: Callable[[Step], None] | None = None) -> list[list[int]] | torch.Tensor:
    """Given a list of prompts, the new tokens of each (lists of token ids, lengths may differ);
    given a (batch, seq) tensor, a (batch, seq + new) tensor: the prompts, then the new tokens.

    Token ids may be Python or numpy integers. ``temperature=0`` is greedy decoding; otherwise
    tokens are sampled from softmax(logits / temperature), restricted to the ``top_k`` most likely
    and to the ``top_p`` nucleus when given. ``seed`` makes sampling reproducible. A prompt stops
    after ``max_new_tokens`` or after producing ``eos_token_id`` (included in its output); in a
    tensor, a row that stopped early is filled with ``eos_token_id`` up to the longest row's end.
    ``use_cache=False`` re-runs the model on the whole window each step (slower; the same greedy
    tokens). ``on_step`` receives each step's tokens as :func:`stream` yields them.
    """
    steps = stream(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, eos_token_id=eos_token_id, use_cache=use_cache)
    new = collect(steps, len(prompts), on_step)
    if not isinstance(prompts, torch.Tensor):
        return new
    width = max(len(row) for row in new)
    filled = [row + [eos_token_id] * (width - len(row)) for row in new]
    appended = torch.tensor(filled, dtype=prompts.dtype, device=prompts.device).view(len(new), width)
    return torch.cat([prompts, appended], dim=1)


def model_generate(self: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = DEFAULT_TEMPERATURE,
                   top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                   seed: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """``GPT.generate``: idx (batch, seq) of token ids in, (batch, seq + new) out, the prompt included,
    with the key/value cache unless ``use_cache=False``: nanoGPT's ``model.generate`` and the plain
    loop that appends each step's token to idx. Arguments as for :func:`generate`; rows that reach
    ``eos_token_id`` are filled with it until every row has stopped or ``max_new_tokens`` are made."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"GPT.generate takes a (batch, seq) tensor of token ids, got {type(idx).__name__} "
                        "(gptfast.generate takes lists of token ids)")
    return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    eos_token_id=eos_token_id, use_cache=use_cache)


# The method lives here, not in model.py, which generation imports (the package's imports have no cycles).
GPT.generate = model_generate
