"""The engine's attention function: each layer's queries, keys and values recorded as the model's own attention
receives them (after RoPE, after any head split), then SDPA; both models keep SDPA or flash attention while the
attention and relation terms read what the maps are made of (kernels/attention.py computes the terms from them).

transformers' BERT, RoBERTa, ELECTRA, ALBERT, DistilBERT, MobileBERT and ModernBERT call their attention through
``AttentionInterface``: a model built with ``attn_implementation=NAME`` calls :func:`attend` in every layer.
MiniALBERT (ours) calls it directly. DeBERTa computes its disentangled scores itself, so it has no such call
and its maps stay on eager attention (models/outputs.py says which path each family takes).

One more thing :func:`attend` does on CPUs. There, SDPA takes its fused (flash) kernel only without dropout: a
student training with attention dropout (BERT's 0.1) falls back to the math path, which materialises the
``[B, heads, T, T]`` scores, probabilities, dropout mask and dropped probabilities for backward in every layer:
measured here, 1.06 GiB per layer at 2 x 2 heads x 4,096 tokens against 28 MiB without dropout. So on a CPU,
with dropout, a layer whose map would exceed BLOCKED_ABOVE runs in blocks of query rows, each recomputed in
backward from the RNG state it started from (so with the same dropout mask): memory linear in T. GPUs keep plain
SDPA (flash and memory-efficient attention apply dropout in their tiles), and so do smaller maps (the demo's),
where the result is SDPA's to the bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "biodistill_sdpa"
# CPU dropout path: one layer's [B, heads, T, T] fp32 map above this is computed in blocks, of at most
# BLOCK_BYTES each (small enough to stay in an L3 cache: the elementwise passes are most of the time)
BLOCKED_ABOVE, BLOCK_BYTES = 64 * 2**20, 4 * 2**20


@dataclass
class Captured:
    """One attention layer's inputs: ``[B, heads, T, head_dim]`` each, and the score scale it applies."""

    query: torch.Tensor
    key: torch.Tensor
    value: Optional[torch.Tensor]
    scaling: float


class Capture:
    """What one forward's attention layers received, for the layers asked for (0-based, in call order: a
    shared layer applied R times, as MiniALBERT's, counts R layers). Values only where ``values`` says."""

    def __init__(self, layers: frozenset[int], values: frozenset[int] = frozenset()):
        self.layers, self.values = layers, values
        self.calls = 0
        self.layer: dict[int, Captured] = {}

    def add(self, query, key, value, scaling: float) -> None:
        if self.calls in self.layers:
            kept = value if self.calls in self.values else None
            self.layer[self.calls] = Captured(query, key, kept, scaling)
        self.calls += 1


_ACTIVE: ContextVar[Optional[Capture]] = ContextVar("biodistill_capture", default=None)


@contextlib.contextmanager
def capturing(capture: Optional[Capture]) -> Iterator[Optional[Capture]]:
    """Attention layers that run inside the block record into ``capture`` (nothing is recorded for None)."""
    token = _ACTIVE.set(capture)
    try:
        yield capture
    finally:
        _ACTIVE.reset(token)


def attend(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
           **kwargs):  # fmt: skip
    """transformers' attention-function signature: ``query``, ``key``, ``value`` ``[B, heads, T, d]`` -> the
    attention output ``[B, T, heads, d]`` and no maps. Records into the active :class:`Capture`, then SDPA."""
    capture = _ACTIVE.get()
    if capture is not None:
        capture.add(query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5)
    if dropout > 0 and query.device.type == "cpu" and _map_bytes(query, key) > BLOCKED_ABOVE:
        return _cpu_dropout_blocks(query, key, value, attention_mask, dropout, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)  # fmt: skip


def _map_bytes(query: torch.Tensor, key: torch.Tensor) -> int:
    B, H, T, _ = query.shape
    return 4 * B * H * T * key.shape[2]


class _DropoutBlocks(torch.autograd.Function):
    """SDPA with dropout on a CPU, a block of query rows at a time: the forward keeps each block's output (in one
    preallocated tensor) and the CPU RNG state it started from; the backward replays each block from that state,
    so its dropout mask is the forward's, and takes its gradients. Only one block's math-path temporaries
    ([B, heads, rows, T] scores, probabilities, dropout mask) exist at a time. Nothing small is allocated per
    block between them: interleaved small tensors kept glibc from reusing the freed blocks (measured: 2.1 GiB
    of resident memory at 4,096 tokens for two layers, against 0.3 GiB this way)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, dropout, scaling, rows):
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
        states = []
        for i in range(0, query.shape[2], rows):
            states.append(torch.get_rng_state())
            out[:, :, i : i + rows] = F.scaled_dot_product_attention(
                query[:, :, i : i + rows], key, value, attn_mask=_rows_of(mask, i, rows), dropout_p=dropout,
                scale=scaling,
            )  # fmt: skip
        ctx.save_for_backward(query, key, value, mask)
        ctx.args, ctx.states = (dropout, scaling, rows), states
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, mask = ctx.saved_tensors
        (dropout, scaling, rows), states = ctx.args, ctx.states
        dq, dk, dv = torch.empty_like(query), torch.zeros_like(key), torch.zeros_like(value)
        after = torch.get_rng_state()
        for n, i in enumerate(range(0, query.shape[2], rows)):
            torch.set_rng_state(states[n])  # the block's own dropout mask, drawn again
            with torch.enable_grad():
                q, k, v = (x.detach().requires_grad_() for x in (query[:, :, i : i + rows], key, value))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=_rows_of(mask, i, rows), dropout_p=dropout,
                                                     scale=scaling)  # fmt: skip
                gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad[:, :, i : i + rows])
            dq[:, :, i : i + rows] = gq
            dk += gk
            dv += gv
        torch.set_rng_state(after)  # the stream goes on from where the forward left it
        return dq, dk, dv, None, None, None, None


def _rows_of(mask: Optional[torch.Tensor], start: int, rows: int) -> Optional[torch.Tensor]:
    """The rows ``start:start+rows`` of an additive or boolean ``[B, 1, 1 or T, T]`` mask."""
    return mask[:, :, start : start + rows] if mask is not None and mask.shape[2] > 1 else mask


def _cpu_dropout_blocks(query, key, value, mask, dropout: float, scaling: Optional[float]) -> torch.Tensor:
    """SDPA with dropout on a CPU in blocks of query rows (``_DropoutBlocks``), as ``[B, T, heads, d]``."""
    rows = max(1, BLOCK_BYTES * query.shape[2] // _map_bytes(query, key))
    return _DropoutBlocks.apply(query, key, value, mask, dropout, scaling, rows).transpose(1, 2).contiguous()


AttentionInterface.register(NAME, attend)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA takes: what transformers builds for "sdpa"
