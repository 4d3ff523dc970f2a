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

``compile=True`` decodes with a static cache (:class:`~gptfast.model.KVCache` with ``static=True``,
allocated at the full context once) through one step of fixed shapes, compiled by ``torch.compile``
once per batch size and replayed for every token (``mode="reduce-overhead"`` on CUDA: a CUDA
graph). The prefill runs eager. Sampling happens on the device, by the exponential-race form of the
same distribution (argmax of probs / noise, the noise drawn from the seed's generator), so a seed
gives other samples than without compile; greedy tokens are the same. Tokens are read back to the
host, and EOS checked, every :data:`READ_BACK_EVERY` steps.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from .model import GPT, KVCache

Prompts = Sequence[Sequence[int]]  # token ids: lists, tuples or numpy arrays of Python or numpy integers
Step = list[int | None]  # one step: each prompt's new token, None for a prompt that has stopped

DEFAULT_TEMPERATURE = 1.0  # of generate, stream, GPT.generate and `gptfast generate`: the model's own distribution
READ_BACK_EVERY = 8  # compiled decoding syncs with the host (reads its tokens, checks EOS) once per this many
NONFINITE = -1  # the token read back for a row whose logits held NaN or inf: generation stops with an error


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
    probs = _probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _probabilities(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
                   ) -> torch.Tensor:
    """Softmax of the tempered, filtered logits, in float64 (see :func:`pick_tokens`)."""
    logits = logits.double()
    tempered = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    return filter_logits(tempered, top_k, top_p).softmax(dim=-1)


def race_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                noise: torch.Tensor | None) -> torch.Tensor:
    """:func:`pick_tokens` without a generator argument, as a compiled graph needs: given ``noise``
    (batch, vocab) of Exponential(1) draws, argmax(probs / noise) is a sample of probs (the first
    of independent exponential clocks of rates probs to ring). Greedy (temperature 0) takes no noise."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = _probabilities(logits, temperature, top_k, top_p)
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def _noise(batch: int, vocab: int, temperature: float, device: torch.device,
           generator: torch.Generator | None) -> torch.Tensor | None:
    """Exponential(1) draws for :func:`race_tokens` (outside any compiled graph: it takes the generator)."""
    if temperature == 0:
        return None
    return torch.empty(batch, vocab, dtype=torch.float64, device=device).exponential_(generator=generator)


def _decode_step(model: GPT, token: torch.Tensor, cache: KVCache, left_pad: torch.Tensor | None,
                 noise: torch.Tensor | None, temperature: float, top_k: int | None, top_p: float | None
                 ) -> torch.Tensor:
    """The static decode step: each row's next token after ``token`` (batch,), written into the
    static ``cache`` at its (tensor) length, -1 where the logits are not finite (:func:`_finite_rows`).
    No shape depends on the position."""
    logits, _ = model(token[:, None], cache=cache, left_pad=left_pad, last_only=True)
    logits, finite = _finite_rows(logits[:, -1])
    return torch.where(finite, race_tokens(logits, temperature, top_k, top_p, noise), NONFINITE)


def _finite_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``logits`` with every row that holds a NaN or inf set to zeros, so that picking a token from it
    cannot fail; which rows were finite). The caller marks the others' tokens :data:`NONFINITE`: the
    check costs no host sync, its result arrives with the tokens."""
    finite = torch.isfinite(logits).all(dim=-1)
    return logits.masked_fill(~finite[:, None], 0.0), finite


_compiled_steps: dict[str, Callable] = {}


def compiled_decode_step(device: torch.device) -> Callable:
    """:func:`_decode_step` under ``torch.compile`` for ``device``'s type: CUDA graphs on CUDA
    (mode "reduce-overhead"), the default mode elsewhere; static shapes, so each batch size (and
    model configuration) compiles once and every later token replays it."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _compiled_steps:
        _compiled_steps[mode] = torch.compile(_decode_step, mode=mode, dynamic=False, fullgraph=True)
    return _compiled_steps[mode]


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
           seed: int | None = None, eos_token_id: int | None = None, use_cache: bool = True,
           compile: bool = False) -> Iterator[Step]:
    """An iterator over the steps: each prompt's new token, or None for a prompt that has stopped.

    Arguments as for :func:`generate`, checked here, at the call, before any step runs. The model
    is in eval mode while the iterator runs. With ``compile`` the steps arrive in bursts of
    :data:`READ_BACK_EVERY`, as they are read back from the device.
    """
    checked = _checked_prompts(model, prompts)
    _check_options(model, max_new_tokens, temperature, top_k, top_p, eos_token_id)
    if compile and not use_cache:
        raise ValueError("compile=True decodes through a static key/value cache: it needs use_cache=True")
    context = model.config.context_length
    longer = [i for i, prompt in enumerate(checked) if len(prompt) > context]
    if longer:
        warnings.warn(f"prompts {longer} are longer than the context length {context}: each keeps its last tokens",
                      stacklevel=3)
    top_k = None if top_k is None else int(top_k)
    eos_token_id = None if eos_token_id is None else int(eos_token_id)
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    return _steps(model, checked, int(max_new_tokens), options, seed, eos_token_id, use_cache, compile)


def _steps(model: GPT, prompts: list[list[int]], max_new_tokens: int, options: dict, seed: int | None,
           eos_token_id: int | None, use_cache: bool, compile: bool) -> Iterator[Step]:
    """The decoding loop; ``options``: temperature, top_k and top_p."""
    context = model.config.context_length
    device = model.transformer.wte.weight.device
    tokens, pads = _left_padded(prompts, context, device)
    left_pad = torch.tensor(pads, device=device) if any(pads) else None
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    # A full window drops its oldest quarter, at least one token, and keeps at least one (context 1).
    keep = max(1, context - max(1, context // 4))
    # The static cache has the full context, so its shapes (and the compiled step) are the same every call.
    max_len = context if compile else min(context, tokens.shape[1] + max_new_tokens)
    cache = model.new_cache(len(prompts), max_len, static=compile) if use_cache else None
    decode = compiled_decode_step(device) if compile else None
    cached = 0  # positions in the cache, counted on the host
    pending: list[torch.Tensor] = []  # new tokens still on the device
    new = None  # the last step's tokens (batch,), contiguous: the compiled step's input
    stopped = [False] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for i in range(max_new_tokens):
            if tokens.shape[1] > context:
                dropped = tokens.shape[1] - keep
                tokens, pads = tokens[:, dropped:], [max(0, p - dropped) for p in pads]
                left_pad = torch.tensor(pads, device=device) if any(pads) else None
                if cache is not None:
                    cache.reset()
                    cached = 0
            if decode is not None and new is not None and cached == tokens.shape[1] - 1:
                # Only the newest token is uncached: the compiled step.
                noise = _noise(len(prompts), model.config.vocab_size, options["temperature"], device, generator)
                torch.compiler.cudagraph_mark_step_begin()
                with torch.no_grad():
                    new = decode(model, new.clamp_min(0), cache, left_pad, noise, **options).clone()
            else:
                logits, finite = _finite_rows(_next_token_logits(model, tokens[:, cached:], left_pad, cache))
                if compile:
                    noise = _noise(len(prompts), logits.shape[-1], options["temperature"], device, generator)
                    new = race_tokens(logits, **options, noise=noise)
                else:
                    new = pick_tokens(logits, **options, generator=generator)
                new = torch.where(finite, new, NONFINITE)
            cached = tokens.shape[1] if cache is not None else 0
            tokens = torch.cat([tokens, new.clamp_min(0)[:, None]], dim=1)
            pending.append(new)
            if compile and len(pending) < READ_BACK_EVERY and i < max_new_tokens - 1:
                continue
            yield from _read_back(model, pending, i + 1 - len(pending), stopped, eos_token_id)
            pending = []
            if all(stopped):
                return
    finally:
        model.train(was_training)


def _read_back(model: GPT, pending: list[torch.Tensor], done: int, stopped: list[bool], eos_token_id: int | None
               ) -> Iterator[Step]:
    """The steps of the ``pending`` tokens, after the ``done`` steps read before (one host sync for all),
    None for rows that had stopped; marks rows that produce ``eos_token_id`` as stopped. A
    :data:`NONFINITE` token of a running row stops generation with an error naming the step."""
    for n, new in enumerate(torch.stack(pending, dim=1).T.tolist(), start=done + 1):
        step = []
        for i, token in enumerate(new):
            if token == NONFINITE and not stopped[i]:
                raise _nonfinite_error(model, n, i)
            step.append(None if stopped[i] else token)
            stopped[i] = stopped[i] or token == eos_token_id
        yield step


def _nonfinite_error(model: GPT, step: int, row: int) -> FloatingPointError:
    """The error for logits holding NaN or inf at ``step`` (from 1) of prompt ``row``: it checks
    the weights (this failure path only) and names the first tensor that is not finite."""
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    cause = (f"the model's weights hold NaN or inf ({bad})" if bad is not None else
             f"the weights are finite, so the activations overflowed (weights in {model.transformer.wte.weight.dtype})")
    return FloatingPointError(f"the logits are NaN or inf at step {step} of generation (prompt {row}): {cause}")


@torch.no_grad()
def _next_token_logits(model: GPT, uncached: torch.Tensor, left_pad: torch.Tensor | None,
                       cache: KVCache | None) -> torch.Tensor:
    """Logits (batch, vocab) for the token after the window whose ``uncached`` tokens (all of them
    without a cache) still have to run."""
    logits, _ = model(uncached, cache=cache, left_pad=left_pad, last_only=True)
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
             compile: bool = False, on_step: Callable[[Step], None] | None = None) -> list[list[int]] | torch.Tensor:
    """Given a list of prompts, the new tokens of each (lists of token ids, lengths may differ);
    given a (batch, seq) tensor, a (batch, seq + new) tensor: the prompts, then the new tokens (in the
    prompts' dtype, or int64 where that cannot hold every token id: uint8 prompts of a larger vocabulary).

    Token ids may be Python or numpy integers. ``temperature=0`` is greedy decoding; otherwise
    tokens are sampled from softmax(logits / temperature), restricted to the ``top_k`` most likely
    and to the ``top_p`` nucleus when given. ``seed`` makes sampling reproducible. A prompt stops
    after ``max_new_tokens`` or after producing ``eos_token_id`` (included in its output); in a
    tensor, a row that stopped early is filled with ``eos_token_id`` up to the longest row's end.
    ``use_cache=False`` re-runs the model on the whole window each step (slower; the same greedy
    tokens). ``compile=True``: the decode step compiled and replayed (see the module's docstring;
    the prefill stays eager). ``on_step`` receives each step's tokens as :func:`stream` yields them.
    """
    steps = stream(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, eos_token_id=eos_token_id, use_cache=use_cache, compile=compile)
    new = collect(steps, len(prompts), on_step)
    if not isinstance(prompts, torch.Tensor):
        return new
    width = max(len(row) for row in new)
    filled = [row + [eos_token_id] * (width - len(row)) for row in new]
    # The prompts' dtype, unless it cannot hold every token id (uint8 prompts of GPT-2's vocabulary): int64.
    fits = torch.iinfo(prompts.dtype).max >= model.config.vocab_size - 1
    dtype = prompts.dtype if fits else torch.long
    appended = torch.tensor(filled, dtype=dtype, device=prompts.device).view(len(new), width)
    return torch.cat([prompts.to(dtype), appended], dim=1)


def model_generate(self: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = DEFAULT_TEMPERATURE,
                   top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                   seed: int | None = None, use_cache: bool = True, compile: bool = False) -> torch.Tensor:
    """``GPT.generate``: idx (batch, seq) of token ids in, (batch, seq + new) out, the prompt included,
    with the key/value cache unless ``use_cache=False``: nanoGPT's ``model.generate`` and the plain loop
    that appends each step's token to idx. ``compile=True`` compiles the decode step and replays it
    (see :func:`generate`). Arguments as for :func:`generate`; rows that reach
    ``eos_token_id`` are filled with it until every row has stopped or ``max_new_tokens`` are made."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"GPT.generate takes a (batch, seq) tensor of token ids, got {type(idx).__name__} "
                        "(gptfast.generate takes lists of token ids)")
    return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    eos_token_id=eos_token_id, use_cache=use_cache, compile=compile)


# The method lives here, not in model.py, which generation imports (the package's imports have no cycles).
GPT.generate = model_generate
