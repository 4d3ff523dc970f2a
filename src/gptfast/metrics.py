"""Model FLOPs per token and the GPU peaks that model FLOPs utilisation (MFU) divides by."""

from __future__ import annotations

import torch

from .model import GPT, GPTConfig

# Dense bf16 tensor-core peaks (FLOP/s) for model FLOPs utilisation; the first name found in the
# device name wins, so the more specific names come first.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}


def model_flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's 12 * layers * T * width.

    The weights exclude the position embeddings (a lookup, not a matmul); the attention term counts
    the full T x T score matrix, as PaLM's MFU does.
    """
    with torch.device("meta"):
        n = GPT(config).num_parameters(exclude_position_embeddings=True)
    T = seq_len or config.context_length
    return 6.0 * n + 12.0 * config.n_layer * T * config.n_embd


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, when it is a GPU in :data:`PEAK_BF16_FLOPS`."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
