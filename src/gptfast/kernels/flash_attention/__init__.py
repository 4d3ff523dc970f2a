"""Scaled dot-product attention over (batch, heads, seq, head_dim) tensors, causal by default.

With fewer queries than keys (decoding with a key/value cache) the causal mask is aligned
bottom-right: the last query sees every key, query i sees keys up to ``i + (Tk - Tq)``.
``key_start`` (one integer per batch row) hides that row's leading keys, the left padding of a
batch of prompts of different lengths. A query that sees no key at all (a padding query) outputs
zeros and gets zero gradients, never NaN.

The Triton path is a flash attention: the (Tq, Tk) score matrix is never stored. The forward pass
walks over key blocks with an online softmax and saves one log-sum-exp per query row; the backward
pass recomputes the probabilities from it.
Three backward kernels, none with atomics, so gradients are identical run to run, with
FlashAttention-2's 5 matrix products and 1 exponential per score:

* ``attention_bwd_delta``: the row statistics, delta_i = dot(dO_i, O_i) and the log-sum-exp in
  log2 units, each a float per query row in rows of a multiple of 16 (so that the other kernels
  read them in 128-bit loads whatever the length);
* ``attention_bwd_kv``: one key block per program, looping over the query blocks that see it: dK,
  dV and each tile's share of dQ, written to a float32 workspace (per key block, the query rows
  that see it rounded up to whole query blocks, again for 128-bit accesses; at GPT-2 124M's batch
  16 x 12 heads x 1024 tokens, causal: 216 MiB with sm_90's 128-key blocks, 408 MiB with sm_80's 64);
* ``attention_bwd_dq_reduce``: one query block per program, the key blocks' shares summed in a
  fixed order.

Where the workspace would pass ``launch.DQ_WORKSPACE_LIMIT`` (1 GiB), ``attention_bwd_q`` replaces
the sum: one query block per program, looping over the key blocks it sees and recomputing the
scores (7 products and 2 exponentials per score); ``deterministic=False`` there lets the dK/dV
kernel add its dQ shares into a float32 dQ with atomics instead, in an order, so dQ's last bits,
that varies from run to run: the delta kernel zeroes that float32 dQ, and once a program has added
all its shares it counts itself done with each query block it saw, the last to count converting the
block's dQ to the inputs' dtype, so neither a fill nor a conversion takes a pass of its own.

Decoding (at most ``launch.DECODE_ROWS`` queries, no dropout) takes a split-key forward instead
(flash-decoding): the keys are cut into chunks, enough that batch x heads x chunks programs fill
every SM, each program writing its chunk's partial output and log-sum-exp, and a small reduction
combines them in chunk order (no atomics). Only it takes ``key_end``; the backward is the same.

Under the causal mask the work per program grows with the query block (forward, dQ) and shrinks
with the key block (dK, dV): programs are mapped to blocks so that the heaviest are launched first
and the light ones fill the last wave, rather than a few heavy ones running alone at the end.

Dropout on the probabilities draws one Philox number per (batch x head, query, key) from a seed,
so the backward kernels regenerate the forward's mask exactly whatever their block sizes. The
seed comes from torch's default generator: ``torch.manual_seed`` makes dropout reproducible.

The block sizes and launch parameters are data: one JSON table per GPU class in ``configs/``
(``load_table`` and ``write_table`` read and write them), the class chosen by the GPU's shared
memory per block (``table_for``).

The package: ``reference`` (the float64 reference and the masks), ``kernels`` (Triton), ``table``
(the configuration schema, its JSON files and the choice per GPU), ``launch`` (the launchers, with
explicit configurations, and the custom operators), ``op`` (checks and the public function) and
``spec`` (what the lab, the benchmarks and the tests read: ``SPECS``).
"""

from .op import MAX_BATCH_HEADS, MAX_HEAD_DIM, flash_attention
from .reference import attention_reference, causal_mask, visible_mask
from .spec import SPECS
from .table import (
    ARCHES,
    CONFIG_DIR,
    ELEMENT_SIZES,
    HEAD_DIM_PADS,
    INTERPRETER_CONFIGS,
    SHARED_MEMORY,
    TABLE_KEYS,
    AttentionConfigs,
    BlockConfig,
    ConfigTable,
    configs_for,
    head_dim_pad,
    load_table,
    table_for,
    table_path,
    tuned_configs,
    write_table,
)

__all__ = ["ARCHES", "CONFIG_DIR", "ELEMENT_SIZES", "HEAD_DIM_PADS", "INTERPRETER_CONFIGS", "MAX_BATCH_HEADS",
           "MAX_HEAD_DIM", "SHARED_MEMORY", "SPECS", "TABLE_KEYS", "AttentionConfigs", "BlockConfig", "ConfigTable",
           "attention_reference", "causal_mask", "configs_for", "flash_attention", "head_dim_pad", "load_table",
           "table_for", "table_path", "tuned_configs", "visible_mask", "write_table"]
