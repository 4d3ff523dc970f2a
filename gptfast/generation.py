"""Text generation: greedy decoding or sampling (temperature, top-k, top-p) for batches of prompts.

Prompts of different lengths are left-padded into one batch; the model masks the padding and
numbers each row's positions from its first real token, so every row gets the tokens it would get
alone. With ``use_cache=True`` a :class:`~gptfast.model.KVCache` is allocated once and each step
feeds only the newest token; with ``use_cache=False`` each step re-runs the model on the whole
window. Both see the same windows, so greedy decoding gives the same tokens either way.

The window: prompts longer than the context are cropped to their last ``context_length`` tokens
(with a warning). When a sequence outgrows the context, the oldest quarter of the window is dropped
and the cache is recomputed from the rest: position embeddings are absolute, so cached keys cannot
simply shift. The batch slides as one, so past the context a row's tokens can differ from those it
gets alone.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterator

import torch

from .model import GPT, KVCache

Prompts = list[list[int]]


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


def pick_tokens(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` (batch, vocab): the argmax when temperature is 0, else a sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _check_arguments(model: GPT, prompts: Prompts, max_new_tokens: int, temperature: float,
                     top_k: int | None, top_p: float | None, eos_token_id: int | None) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"generate needs a gptfast GPT model, got {type(model).__name__} "
                        "(use gptfast.patch for other models)")
    vocab = model.config.vocab_size
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"prompt {i} must be a list of int token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary [0, {vocab})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if eos_token_id is not None and not 0 <= eos_token_id < vocab:
        raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {vocab})")


def _left_padded(prompts: Prompts, context_length: int, device: torch.device
                 ) -> tuple[torch.Tensor, list[int]]:
    """The prompts cropped to the context, as one left-padded (batch, longest) tensor, and the
    number of padding tokens per row (kept on the host: deciding on padding needs no sync)."""
    cropped = [list(p[-context_length:]) for p in prompts]
    longest = [i for i, p in enumerate(prompts) if len(p) > context_length]
    if longest:
        warnings.warn(f"prompts {longest} are longer than the context length {context_length}: "
                      "each keeps its last tokens", stacklevel=3)
    width = max(len(p) for p in cropped)
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in cropped], device=device)
    return tokens, [width - len(p) for p in cropped]


def stream(model: GPT, prompts: Prompts, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           eos_token_id: int | None = None, use_cache: bool = True) -> Iterator[list[int | None]]:
    """An iterator over the steps: each prompt's new token, or None for a prompt that has stopped.

    Arguments as for :func:`generate` (checked here, at the call). The model is in eval mode while
    the iterator runs.
    """
    _check_arguments(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id)
    return _steps(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, use_cache)


def _steps(model: GPT, prompts: Prompts, max_new_tokens: int, temperature: float, top_k: int | None,
           top_p: float | None, seed: int | None, eos_token_id: int | None, use_cache: bool
           ) -> Iterator[list[int | None]]:
    context = model.config.context_length
    device = model.transformer.wte.weight.device
    tokens, pads = _left_padded(prompts, context, device)
    left_pad = torch.tensor(pads, device=device) if any(pads) else None
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    # The window drops its oldest quarter when full, at least one token.
    keep = context - max(1, context // 4)
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


def generate(model: GPT, prompts: Prompts, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | None = None, use_cache: bool = True,
             on_step: Callable[[list[int | None]], None] | None = None) -> list[list[int]]:
    """The new tokens of each prompt (lists of token ids, lengths may differ).

    ``temperature=0`` is greedy decoding; otherwise tokens are sampled from softmax(logits /
    temperature), restricted to the ``top_k`` most likely and to the ``top_p`` nucleus when given.
    ``seed`` makes sampling reproducible. A prompt stops after ``max_new_tokens`` or after
    producing ``eos_token_id`` (included in its output). ``use_cache=False`` re-runs the model on
    the whole window each step (slower; the same greedy tokens). ``on_step`` receives each step's
    tokens as :func:`stream` yields them.
    """
    steps = stream(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, eos_token_id=eos_token_id, use_cache=use_cache)
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in steps:
        if on_step is not None:
            on_step(step)
        for output, token in zip(outputs, step):
            if token is not None:
                output.append(token)
    return outputs
