"""CPU-only kernels of the ImageBERT model: fast paths used only in CPU training (CUDA keeps PyTorch's fused ops).

Part of the remote-code unit: `modeling_imagebert.py` imports it relatively, so `save_pretrained` copies it next to
the weights and `trust_remote_code=True` loads it without our package. It imports only torch.

Each kernel computes what the PyTorch op computes (same function, same dropout rate), only cheaper on CPU; the plain
path stays available through `ImageBertPreTrainedModel.set_fast_paths(fast_dropout=False)`, tests/test_fast_paths.py
checks that the two agree, and benchmarks/bench_cpu_kernels.py measures each against the op it replaces (base size,
batch 8 x 144 positions, forward + backward, 2 idle cores, torch 2.14.1; figures in benchmarks/RESULTS.md):
- `_fast_dropout` / `_fast_dropout_add` (mask from 32-bit random words): 1.42x F.dropout fp32, 1.40x bf16;
- `_cpu_training_attention` (attention with dropout, without SDPA's CPU math fallback): 1.45x SDPA fp32, 1.27x bf16.
"""

import sys

import torch
from torch import nn
from torch.nn import functional as F


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bernoulli(1 - p) keep mask, bool `shape`, from 32-bit random words.

    `bernoulli_` draws one random number per element; here one 64-bit draw (`random_()` gives 63 random bits) makes
    two masks: the low 32-bit word is compared with round((1 - p) 2^32), the high word (31 random bits) with
    round((1 - p) 2^31). The keep probability is therefore 1 - p to within 2^-32, as exact as `bernoulli_`'s float
    comparison, at about a third of the cost of `bernoulli_` on CPU.
    """
    numel = shape.numel()
    words = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device).random_().view(torch.int32)
    keep = 1.0 - p
    low = min(round(keep * 2**32), 2**32 - 1) - 2**31  # the low word is uniform over all int32 values
    high = min(round(keep * 2**31), 2**31 - 1)  # the high word is uniform over [0, 2^31)
    thresholds = [low, high] if sys.byteorder == "little" else [high, low]
    words = words.view(-1, 2) < torch.tensor(thresholds, dtype=torch.int32, device=device)  # (N/2, 2)
    return words.view(-1)[:numel].view(shape)


def _use_fast_dropout(module: nn.Module, hidden_states: torch.Tensor, p: float) -> bool:
    # On CUDA `F.dropout` is already one fused kernel with a cheap counter-based generator. Under `torch.compile`
    # `F.dropout` too: the compiler fuses its mask into the neighbouring ops, and dynamo cannot trace `random_`.
    return (
        not torch.compiler.is_compiling()
        and module.training
        and p > 0
        and getattr(module, "fast_dropout", True)
        and hidden_states.device.type == "cpu"
    )


def _fast_dropout(hidden_states: torch.Tensor, p: float) -> torch.Tensor:
    """`F.dropout(hidden_states, p, training=True)` with the cheaper mask of `_keep_mask`; backward keeps the bool
    mask (1 byte per element) where `F.dropout` keeps a float one."""
    if p >= 1:
        return hidden_states * 0.0
    keep = _keep_mask(hidden_states.shape, p, hidden_states.device)
    return torch.where(keep, hidden_states * (1.0 / (1.0 - p)), 0.0)


def _fast_dropout_add(hidden_states: torch.Tensor, residual: torch.Tensor, p: float) -> torch.Tensor:
    """`residual + F.dropout(hidden_states, p, training=True)`, with the mask of `_fast_dropout`."""
    return residual + _fast_dropout(hidden_states, p)


def _cpu_training_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float,
) -> torch.Tensor:
    """Attention with dropout on the probabilities, for CPU training: (B, nh, L, hs) -> (B, L, nh, hs).

    What SDPA computes, without its CPU fallback for dropout > 0 (the math kernel, which upcasts bf16 inputs to fp32
    and draws a float per probability); the softmax stays in fp32 as under autocast.
    `attention_mask` is None, bool (True = attend) or additive, broadcastable to (B, nh, L, L).
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, nh, L, L)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32)
    probs = _fast_dropout(probs, dropout).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2)  # (B, L, nh, hs)
