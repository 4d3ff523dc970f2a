"""HellaSwag, and any multiple-choice set in its JSONL format: which ending a model finds likeliest.

Each line of the file is a JSON object with ``ctx`` (the context), ``endings`` (the candidate
endings, four in HellaSwag) and ``label`` (the index of the right one). Every ending is tokenized
after a space (``" " + ending``, as llm.c and build-nanogpt do) and scored by the model's
next-token loss over its tokens given the context: ``acc`` picks the ending of least summed loss,
``acc_norm`` the one of least mean loss per token (llm.c's and build-nanogpt's ``acc_norm``; the
HellaSwag paper's GPT-2 numbers are of this kind). The rows of several examples run through one
forward pass without a key/value cache, right-padded, the padding never scored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .distributed import World
from .precision import autocast
from .tokenizer import Tokenizer

FIELDS = ("ctx", "endings", "label")


@dataclass(frozen=True)
class Example:
    """One question: the context's and each ending's token ids, the right ending, and where it was read."""

    context: list[int]
    endings: list[list[int]]
    label: int
    where: str  # file:line


@dataclass
class Score:
    """How many examples the model got right by summed (``acc``) and mean (``acc_norm``) ending loss."""

    examples: int
    correct: int
    correct_norm: int
    losses: list[list[tuple[float, float]]] = field(default_factory=list)  # (summed, mean) per ending, this rank's

    @property
    def acc(self) -> float:
        return self.correct / self.examples

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.examples


def _record(line: str, where: str) -> tuple[str, list[str], int]:
    """(ctx, endings, label) of one line, every field checked; a bad one is one error naming ``where``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON (column {error.colno}: {error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: holds a {type(record).__name__}, expected a JSON object with {', '.join(FIELDS)}")
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise ValueError(f"{where}: no {missing[0]!r} field (a HellaSwag line has {', '.join(FIELDS)})")
    context, endings, label = (record[name] for name in FIELDS)
    if not isinstance(context, str):
        raise ValueError(f"{where}: field 'ctx' is {context!r}, expected a string")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"{where}: field 'endings' is {str(endings)[:80]}, expected a list of two or more strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise ValueError(f"{where}: field 'label' is {label!r}, expected an index into the {len(endings)} endings")
    return context, endings, label


def read_examples(path: str | os.PathLike, tokenizer: Tokenizer, context_length: int) -> list[Example]:
    """The examples of a HellaSwag-format JSONL file, tokenized; a bad line (or one whose ending
    does not fit ``context_length`` after one context token) is an error naming the file and line."""
    path = Path(path)
    examples = []
    try:
        f = open(path, "rb")
    except OSError as error:
        raise ValueError(f"the HellaSwag file (--hellaswag) {str(path)!r} cannot be read: {error.strerror}") from None
    with f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not UTF-8 text (byte {error.start} of the line)") from None
            if not line.strip():
                continue
            context, endings, label = _record(line, where)
            try:
                ids = tokenizer.encode(context), [tokenizer.encode(" " + ending) for ending in endings]
            except ValueError as error:  # a character a char-level vocabulary lacks
                raise ValueError(f"{where}: {error}") from None
            longest = max(len(e) for e in ids[1])
            if not ids[0] or longest >= context_length or not min(len(e) for e in ids[1]):
                raise ValueError(f"{where}: the context and each ending need at least one token and an ending at "
                                 f"most {context_length - 1} (the model's context is {context_length}); "
                                 f"here the context has {len(ids[0])} and the longest ending {longest}")
            examples.append(Example(ids[0], ids[1], label, where))
    if not examples:
        raise ValueError(f"{path}: no examples (a HellaSwag file holds one JSON object per line)")
    return examples


def _rows(example: Example, context_length: int) -> list[tuple[list[int], int]]:
    """Each ending after its context as (token ids, index of the ending's first token); a row longer
    than the context keeps its last ``context_length`` tokens."""
    rows = []
    for ending in example.endings:
        ids = (example.context + ending)[-context_length:]
        rows.append((ids, len(ids) - len(ending)))
    return rows


def _ending_losses(model: torch.nn.Module, rows: list[tuple[list[int], int]], amp_dtype: torch.dtype | None,
                   device: torch.device) -> list[tuple[float, float]]:
    """(summed, mean) next-token loss of each row's ending, from one forward pass over the padded rows."""
    width = max(len(ids) for ids, _ in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (ids, start) in enumerate(rows):
        idx[i, : len(ids)] = torch.tensor(ids)
        targets[i, start - 1: len(ids) - 1] = idx[i, start: len(ids)]  # position p predicts token p + 1
    idx, targets = idx.to(device), targets.to(device)
    with autocast(device.type, amp_dtype):
        logits, _ = model(idx)
    scored = targets != -1  # only the endings' positions are taken to float32: the logits are the widest tensor
    losses = F.cross_entropy(logits[scored].float(), targets[scored], reduction="none").double()
    row = torch.arange(len(rows), device=device)[:, None].expand(-1, width)[scored]
    summed = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row, losses)
    counts = scored.sum(dim=1)
    return list(zip(summed.tolist(), (summed / counts).tolist()))


@torch.no_grad()
def score(model: torch.nn.Module, examples: list[Example], batch_size: int = 8,
          amp_dtype: torch.dtype | None = None, ctx: World | None = None) -> Score:
    """The model's accuracy on ``examples``, ``batch_size`` examples (all their endings) per forward
    pass; under several processes (``ctx``) the examples are dealt out by rank and the counts summed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ctx = ctx or World()
    device = next(model.parameters()).device
    context_length = model.config.context_length
    mine = examples[ctx.rank::ctx.size]
    # every process runs as many forward passes as the first (a sharded model gathers its weights in
    # each, with all processes): one with fewer examples scores its first again and drops the result
    passes = -(-len(examples[::ctx.size]) // batch_size)
    losses: list[list[tuple[float, float]]] = []
    was_training = model.training
    model.eval()
    try:
        for first in range(0, passes * batch_size, batch_size):
            batch = mine[first: first + batch_size]
            rows = [row for example in batch or examples[:1] for row in _rows(example, context_length)]
            flat = iter(_ending_losses(model, rows, amp_dtype, device))
            losses.extend([next(flat) for _ in example.endings] for example in batch)
    finally:
        model.train(was_training)
    correct = sum(_least(scores, 0) == example.label for example, scores in zip(mine, losses))
    correct_norm = sum(_least(scores, 1) == example.label for example, scores in zip(mine, losses))
    counts = torch.tensor([correct, correct_norm], dtype=torch.float64, device=device)
    total = (ctx.mean(counts) * ctx.size).round().long().tolist()
    return Score(len(examples), total[0], total[1], losses)


def _least(scores: list[tuple[float, float]], which: int) -> int:
    """The index of the ending whose loss (summed: 0, mean: 1) is least; the first of a tie."""
    return min(range(len(scores)), key=lambda i: scores[i][which])
