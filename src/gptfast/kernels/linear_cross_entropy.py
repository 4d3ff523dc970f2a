"""The LM head and its loss without the logits: ``cross_entropy(hidden @ weight.T, targets)`` in chunks.

For GPT-2 124M at batch 16 x 1024 the logits are 16,384 x 50,304 values (1.65 GB in bf16) and their
gradient as much again: the largest tensors of a training step. Here the rows go through in chunks;
for each chunk:

1. the chunk's logits are one matmul (cuBLAS, in the autocast dtype);
2. one cross-entropy kernel writes its per-row losses and overwrites the logits, in place, with
   the gradient of their sum (softmax - onehot): each row read once and written once (the one-pass
   kernel of ``cross_entropy``; within ``cross_entropy.two_passes()``, the losses kernel then the
   gradient kernel, which reads the logits again);
3. two matmuls give the chunk's rows of d hidden and its share of d weight (added up in float32).

So the gradients are computed in the forward pass, with no (rows, vocabulary) tensor beyond one
chunk, and the backward pass only scales them by the loss's gradient (without gradients to compute,
as in evaluation, the chunks stop after their losses). That needs a scalar loss:
``reduction`` is "mean" or "sum" (for per-row losses use :func:`cross_entropy` on explicit logits).
The three matmuls are those of the unfused head (forward, d hidden, d weight), so no work is added.
Without Triton, or on the "torch" backend, the chunks use eager PyTorch: the memory saving holds on
any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend, benchmark, spec
from .common import kernel_op
from .cross_entropy import (
    CHUNK_FIELDS,
    ChunkConfig,
    block_config,
    check_options,
    check_target_values,
    cross_entropy,
    cross_entropy_reference,
    every_config,
    every_one_pass_config,
    launch_forward,
    one_pass_config,
    row_chunks,
    two_passes,
    write_gradient,
    write_loss_and_gradient,
)
from .cross_entropy import MODELS as CHUNK_MODELS
from .cross_entropy import TUNABLES as CHUNK_TUNABLES

CHUNK_BYTES = 256 * 2**20  # default memory budget for one chunk of logits


def chunk_rows(n_cols: int, element_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk: as many as ``chunk_bytes`` of logits hold, a multiple of 64 (at least 64)."""
    return max(64, chunk_bytes // max(1, n_cols * element_size) // 64 * 64)


def _eager_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, dloss: torch.Tensor | None,
                         ignore_index: int, num_classes: int, label_smoothing: float, z_loss: float) -> torch.Tensor:
    """Per-row losses of one chunk and, given ``dloss``, its logits overwritten with their gradient:
    eager PyTorch, the kernels' formulas in float32, in place where it can (one float32 copy of the
    chunk at most), as the operator runs below autograd."""
    x = logits[:, :num_classes].float()
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, 0).long()[:, None]
    lse = x.logsumexp(-1, keepdim=True)
    losses = (lse - x.gather(1, safe_targets))[:, 0]
    if label_smoothing > 0:
        losses = (1 - label_smoothing) * losses + label_smoothing * (lse[:, 0] - x.mean(-1))
    if z_loss > 0:
        losses = losses + z_loss * lse[:, 0] ** 2
    losses = torch.where(keep, losses, 0.0)
    if dloss is None:
        return losses
    grad = x.sub_(lse).exp_().mul_(1 + 2 * z_loss * lse)  # x: a view of float32 logits, else a copy
    grad.scatter_add_(1, safe_targets, torch.full_like(lse, label_smoothing - 1)).sub_(label_smoothing / num_classes)
    grad.mul_(torch.where(keep, dloss, 0.0)[:, None])
    logits[:, :num_classes] = grad
    logits[:, num_classes:] = 0
    return losses


def launch_fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                 num_classes: int, label_smoothing: float, z_loss: float, mean: bool, rows_per_chunk: int,
                 dtype: torch.dtype, use_triton: bool, need_grad: bool, forward_config: ChunkConfig,
                 gradient_config: ChunkConfig, one_pass: ChunkConfig | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d sum / d hidden, d sum / d weight in float32) of ``cross_entropy(hidden @ weight.T)``,
    the loss its sum or its mean, the matmuls in ``dtype``; hidden (rows, d), weight (vocabulary, d).
    With gradients, the one-pass kernel writes each chunk's losses and gradients with ``one_pass``; where
    it is None, the losses kernel with ``forward_config``, then the gradient kernel with ``gradient_config``.
    Without gradients, the losses kernel alone.

    The gradients are those of the *sum* of the row losses: a mean's 1 / counted is applied in the
    backward, in float32 and together with the loss's gradient (under float16 autocast, GradScaler's
    scale), so a float16 logits gradient of (p - onehot) / 16,384 rows never underflows. Without
    ``need_grad`` (evaluation) the gradients are not computed and come back empty.
    """
    n_rows = hidden.shape[0]
    ones = torch.ones((), dtype=torch.float32, device=hidden.device).expand(n_rows)
    h, w = hidden.to(dtype), weight.to(dtype)  # as autocast would cast them for nn.Linear
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dhidden = torch.empty_like(hidden) if need_grad else hidden.new_empty(0)
    dweight = torch.zeros(weight.shape if need_grad else 0, dtype=torch.float32, device=weight.device)
    options = (ignore_index, num_classes, label_smoothing, z_loss)
    for start in range(0, n_rows, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, n_rows))
        logits = h[rows] @ w.T
        if not need_grad:
            losses = (launch_forward(logits, targets[rows], *options, forward_config)[0] if use_triton
                      else _eager_loss_and_grad(logits, targets[rows], None, *options))
            total += losses.sum()
            continue
        if use_triton and one_pass is not None:
            losses = write_loss_and_gradient(logits, logits, targets[rows], *options, one_pass)  # in place
        elif use_triton:
            losses, stats = launch_forward(logits, targets[rows], *options, forward_config)
            write_gradient(logits, ones[rows], logits, targets[rows], stats, *options, gradient_config)  # in place
        else:
            losses = _eager_loss_and_grad(logits, targets[rows], ones[rows], *options)
        total += losses.sum()
        dhidden[rows] = logits @ w
        dweight += logits.T @ h[rows]
    return (total / (targets != ignore_index).sum() if mean else total), dhidden, dweight


@kernel_op("linear_cross_entropy")
def _fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, num_classes: int,
           label_smoothing: float, z_loss: float, mean: bool, rows_per_chunk: int, dtype: torch.dtype,
           use_triton: bool, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`launch_fused` with the cross-entropy kernels' configurations for the classes and the rows."""
    return launch_fused(hidden, weight, targets, ignore_index, num_classes, label_smoothing, z_loss, mean,
                        rows_per_chunk, dtype, use_triton, need_grad, block_config(num_classes),
                        block_config(weight.shape[0]), one_pass_config(weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    targets, ignore_index, mean = inputs[2], inputs[3], inputs[7]
    # d loss / d (sum of the row losses): 1 for the sum, 1 / counted for the mean.
    counted = (targets != ignore_index).sum() if mean else torch.ones((), device=targets.device)
    ctx.weight_dtype = inputs[1].dtype
    ctx.save_for_backward(output[1], output[2], counted)


def _gradients(ctx, dloss, _dhidden, _dweight):
    dhidden, dweight, counted = ctx.saved_tensors
    scale = dloss.float() / counted  # float32: the mean's 1 / counted and (float16) GradScaler's scale at once
    return ((dhidden.float() * scale).to(dhidden.dtype), (dweight * scale).to(ctx.weight_dtype),
            *([None] * 10))


_fused.register_autograd(_gradients, setup_context=_setup_context)


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The logits' dtype: autocast's where it is on, as ``nn.Linear`` would compute them (a device
    without autocast, "meta", has none)."""
    device = hidden.device.type
    return (torch.get_autocast_dtype(device) if torch.amp.is_autocast_available(device)
            and torch.is_autocast_enabled(device)
            else torch.promote_types(hidden.dtype, weight.dtype))


def _kernel_problem(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *args, **kwargs) -> str | None:
    """The chunks' losses run on cross_entropy's kernels, on logits in the matmuls' dtype: its check decides."""
    logits = torch.empty(0, weight.shape[0], dtype=_matmul_dtype(hidden, weight), device=hidden.device)
    return backend.kernel_problem(cross_entropy, logits, targets.reshape(-1))


@backend.routed(_kernel_problem)
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -1, reduction: str = "mean", num_classes: int | None = None,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, chunk_bytes: int = CHUNK_BYTES,
                         check_targets: bool = True) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, targets, ...)`` without materialising the logits.

    hidden (..., d), weight (vocabulary, d): an LM head's ``nn.Linear`` weight, tied or not; targets
    (...). The options are :func:`cross_entropy`'s; ``reduction`` is "mean" or "sum". Each chunk of
    rows holds at most ``chunk_bytes`` of logits. The matmuls run in autocast's dtype where autocast
    is on, as ``nn.Linear`` would; gradients reach hidden and weight in their own dtypes.
    """
    if not (isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and hidden.dim() >= 1 and hidden.shape[-1] == weight.shape[1]):
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (hidden, weight)]
        raise ValueError(f"linear_cross_entropy: hidden {shapes[0]} and weight {shapes[1]} do not match: "
                         "need hidden (..., d) and weight (vocabulary, d)")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum' (per-row losses need "
                         f"cross_entropy on explicit logits), got {reduction!r}")
    label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    logits_shape = torch.Size((*hidden.shape[:-1], weight.shape[0]))
    check_options(logits_shape, targets, reduction, num_classes, label_smoothing, z_loss, "linear_cross_entropy")
    num_classes = weight.shape[0] if num_classes is None else num_classes
    if check_targets and not torch.compiler.is_compiling():
        check_target_values(targets, ignore_index, num_classes)
    dtype = _matmul_dtype(hidden, weight)
    hidden2, targets1 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    use_triton = backend.route(linear_cross_entropy, hidden, weight, targets)
    rows = chunk_rows(weight.shape[0], dtype.itemsize, chunk_bytes)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _fused(hidden2, weight, targets1, ignore_index, num_classes, label_smoothing, z_loss,
                  reduction == "mean", rows, dtype, use_triton, need_grad)[0]


# ---------------------------------------------------------------------------------------------
# The spec (``spec.OpSpec``): inputs, the launcher with explicit configurations (the cross-entropy
# kernels', tuned there), lab hooks and the benchmark: the fused head against the logits' matmul then
# F.cross_entropy as autocast runs it, and its torch.compile. The fused head computes the gradients in
# its forward and its backward only scales them: compare forward+backward.
# ---------------------------------------------------------------------------------------------


def _inputs(shape: tuple, dtype: torch.dtype, device: torch.device, options: dict,
            generator: torch.Generator | None) -> spec.Inputs:
    """hidden (rows, d), weight (vocabulary, d), targets among the first ``classes``; options:
    ``label_smoothing``, ``z_loss``, ``chunk_bytes``."""
    rows, d, vocab, classes = (*shape, shape[2])[:4]
    if classes > vocab:
        raise ValueError(f"{classes} classes in a vocabulary of {vocab}")
    make = dict(dtype=dtype, device=device, generator=generator)
    return {"hidden": spec.tensor(rows, d, **make), "weight": spec.tensor(vocab, d, scale=d**-0.5, **make),
            "targets": spec.class_ids(rows, classes, device, generator), "num_classes": classes,
            "label_smoothing": float(options.get("label_smoothing", 0.0)), "z_loss": float(options.get("z_loss", 0.0)),
            "chunk_bytes": int(options.get("chunk_bytes", CHUNK_BYTES))}


def _launchers(inputs: spec.Inputs, configure: spec.Configure, phase: spec.Phase) -> None:
    """The chunks' kernels, losses and gradients, all in the forward (the backward launches nothing)."""
    hidden, weight, classes = inputs["hidden"], inputs["weight"], inputs["num_classes"]
    rows = chunk_rows(weight.shape[0], hidden.element_size(), inputs["chunk_bytes"])
    one_pass = one_pass_config(weight.shape[0])
    with phase("forward"):
        launch_fused(hidden, weight, inputs["targets"], -1, classes, inputs["label_smoothing"], inputs["z_loss"], True,
                     rows, hidden.dtype, True, True, configure(block_config(classes), "cross_entropy_fwd"),
                     configure(block_config(weight.shape[0]), "cross_entropy_bwd"),
                     one_pass and configure(one_pass, "cross_entropy_one_pass"))


def _every_config() -> dict[str, tuple[ChunkConfig, ...]]:
    return {**every_config(), "cross_entropy_one_pass": every_one_pass_config()}


TUNABLES = {**CHUNK_TUNABLES, "cross_entropy_one_pass": spec.Tunable(CHUNK_FIELDS)}
# Held whole: no loop (one iteration per program); streamed: its statistics loop, then its gradient loop.
MODELS = {**CHUNK_MODELS, "cross_entropy_one_pass": spec.KernelModel(row_chunks, masked=row_chunks)}


def _reference(hidden, weight, targets, num_classes, label_smoothing, z_loss, chunk_bytes=CHUNK_BYTES):
    logits = (hidden @ weight.T)[:, :num_classes]
    return cross_entropy_reference(logits, targets, label_smoothing=label_smoothing, z_loss=z_loss).mean()


def _compared_eager(hidden, weight, targets, num_classes, label_smoothing, z_loss, chunk_bytes):
    classes = (hidden @ weight.T)[:, :num_classes]
    loss = F.cross_entropy(classes, targets, label_smoothing=label_smoothing)
    return loss + z_loss * (classes.logsumexp(-1) ** 2).mean() if z_loss else loss


def _eager(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def _two_pass(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with two_passes():
        return linear_cross_entropy(hidden, weight, targets, check_targets=False)


def _bench_inputs(size: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    hidden = torch.randn(size["rows"], size["hidden"], device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(size["vocab"], size["hidden"], device=device, dtype=dtype)
              * size["hidden"] ** -0.5).requires_grad_()
    return hidden, weight, torch.randint(0, size["vocab"], (size["rows"],), device=device)


def _flops(size: dict, elem: int) -> tuple[float, float]:
    """The head's matmuls, wherever they run: the logits (forward), d hidden and d weight (backward)."""
    logits = 2 * size["rows"] * size["hidden"] * size["vocab"]
    return logits, 2 * logits


SPECS = (spec.OpSpec(
    name="linear_cross_entropy", order=60, function=linear_cross_entropy,
    shape_names=("rows", "hidden", "vocabulary", "classes"), optional=1,
    shapes=spec.Shapes(default=(16384, 768, 50304, 50257), small=(96, 32, 300, 297),
                       odd=((300, 24, 131, 120), (65, 12, 200, 199))),
    make_inputs=_inputs, launchers=_launchers,
    compared=(linear_cross_entropy, _reference, _compared_eager),
    config_type=ChunkConfig, every_config=_every_config, tunables=TUNABLES,
    options={"label_smoothing": float, "z_loss": float, "chunk_bytes": int}, models=MODELS,
    benchmarks=(benchmark.KernelBench(
        name="linear_cross_entropy",
        unit="TFLOP/s",
        full=[benchmark.Sweep("rows=16384, hidden=768", "vocab", [dict(rows=16384, hidden=768, vocab=v)
                                                                   for v in (8192, 32768, 50304, 128256)])],
        small=[benchmark.Sweep("rows=24, hidden=16", "vocab", [dict(rows=24, hidden=16, vocab=v) for v in (96, 300)])],
        headline=dict(rows=16384, hidden=768, vocab=50304),  # GPT-2 124M's LM head and loss
        providers={
            "triton": benchmark.triton_backend(lambda h, w, t: linear_cross_entropy(h, w, t, check_targets=False)),
            "triton/two-pass": benchmark.triton_backend(_two_pass),  # the one-pass kernel's baseline
            "torch": benchmark.eager(_eager),
            "torch.compile": benchmark.compiled(_eager),
        },
        make_inputs=_bench_inputs, work=_flops),),
),)
