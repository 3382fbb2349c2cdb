"""`sdpa_varlen`: attention over packed rows that runs SDPA once per packed sequence.

Plain SDPA on a packed row builds a (length x length) block-diagonal mask and computes every score in it, most
of them masked out: the work grows with the square of the row, not of its sequences. This implementation finds
the sequences from `position_ids` (a new one starts wherever the position does not follow the previous one, as
flash-attention's varlen path does) and runs causal SDPA on each, so attention costs what it would for the
sequences one by one and never crosses a boundary. Batches with an attention mask (padded eval batches,
left-padded generation) and KV-cache steps go to transformers' own SDPA path unchanged.

Registered with transformers' AttentionInterface under `sdpa_varlen`; `model.attn_implementation: sdpa` with
`data.packing: true` uses it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"


def sequence_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each packed sequence: a sequence starts where position != previous + 1."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    length = position_ids.shape[1]
    out = []
    for row in starts.cpu():
        s = row.nonzero().flatten().tolist()
        out.append(list(zip(s, s[1:] + [length], strict=True)))
    return out


def varlen_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (batch, heads, q_len, dim), key/value (batch, kv_heads, kv_len, dim) -> (batch, q_len, heads, dim)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = (attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2]
              and position_ids.shape[-1] == query.shape[2])
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{NAME}: attention logit soft-capping is not supported; use eager attention")
    window = kwargs.get("sliding_window")
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dtype = query.dtype
    upcast = query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    if upcast:
        # measured on torch 2.13 CPU: half-precision SDPA is slower than float32 and caches kernels for every
        # new sequence length (memory grows by megabytes per length, without bound); float32 does neither.
        # Autocast would cast the inputs straight back to half precision, so it is off around the call.
        query, key, value = query.float(), key.float(), value.float()
    bounds = sequence_bounds(position_ids.expand(query.shape[0], -1))
    rows = []
    with torch.autocast(query.device.type, enabled=False) if upcast else nullcontext():
        for b, row in enumerate(bounds):
            if window is not None and max(e - s for s, e in row) > window:
                raise ValueError(f"{NAME}: a packed sequence is longer than the model's sliding window ({window})")
            rows.append(torch.cat([
                F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e],
                                               value[b:b + 1, :, s:e], dropout_p=dropout, is_causal=True,
                                               scale=scaling)
                for s, e in row], dim=2))
    return torch.cat(rows).transpose(1, 2).to(dtype).contiguous(), None


def _mask_only_for_padding(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    # packed rows need no mask (the sequences are found from position_ids); padded batches get SDPA's own
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make `sdpa_varlen` loadable as a transformers attn_implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_sdpa_forward)
    AttentionMaskInterface.register(NAME, _mask_only_for_padding)
