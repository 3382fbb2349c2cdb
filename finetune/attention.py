"""`sdpa_varlen`: attention over packed rows that runs SDPA once per packed sequence.

Plain SDPA on a packed row builds a (length x length) block-diagonal mask and computes every score in it, most
of them masked out: the work grows with the square of the row, not of its sequences. This implementation finds
the sequences from `position_ids` (a new one starts wherever the position does not follow the previous one, as
flash-attention's varlen path does) and runs causal SDPA on each, so attention costs what it would for the
sequences one by one and never crosses a boundary. A sequence whose positions start above 0 shares the prompt
of the sequence before it (see `sequence_bounds`): preference pairs run their prompt once. Batches with an
attention mask (padded eval batches, left-padded generation) and KV-cache steps go to transformers' own SDPA
path unchanged.

On a CUDA GPU, in half precision, the rows go to PyTorch's flash-attention varlen kernel
(`torch.nn.attention.varlen`, torch >= 2.10) in one call for the whole batch, the same computation as the
flash-attention package's varlen path with nothing extra to install; a shared prompt's keys are gathered in
front of each branch's own, and a model's sliding window is passed to the kernel.

Registered with transformers' AttentionInterface under `sdpa_varlen`; `model.attn_implementation: sdpa` with
`data.packing: true` uses it.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from functools import cache
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"


def sequence_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """Per row, (start, end, prefix_start, prefix_end) of each packed sequence.

    A sequence starts where position != previous + 1. One that starts at position 0 is a root and has an empty
    prefix (prefix_end == prefix_start). One that starts at position q > 0 is a branch: it continues the first q
    tokens of the last root before it, which it attends to as its prefix (a shared prompt: preference pairs lay
    out `prompt + chosen` then `last prompt token + rejected` at positions q - 1.., so the prompt runs once).
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    length = position_ids.shape[1]
    out = []
    for row_starts, row_pos in zip(starts.cpu(), position_ids.cpu(), strict=True):
        s = row_starts.nonzero().flatten().tolist()
        first = row_pos[s].tolist()
        bounds, root = [], None
        for a, b, q in zip(s, s[1:] + [length], first, strict=True):
            if q == 0:
                root = a
            if q > 0 and root is not None:
                bounds.append((a, b, root, root + q))
            else:
                bounds.append((a, b, a, a))
        out.append(bounds)
    return out


_per_forward: tuple[torch.Tensor, int, dict] | None = None


def _once_per_forward(position_ids: torch.Tensor, key: Any, compute: Any) -> Any:
    """`compute()`, cached for as long as `position_ids` is the same tensor, unmodified: every layer of a
    forward receives the same `position_ids`, and what is derived from it (the bounds read back to the CPU, the
    offsets copied to the GPU) would otherwise cost a device sync per layer. Keyed on the tensor itself and its
    version counter, so a new or modified tensor starts afresh."""
    global _per_forward
    if _per_forward is None or _per_forward[0] is not position_ids or _per_forward[1] != position_ids._version:
        _per_forward = (position_ids, position_ids._version, {})
    values = _per_forward[2]
    if key not in values:
        values[key] = compute()
    return values[key]


def _bounds_once_per_forward(position_ids: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    return _once_per_forward(position_ids, "bounds", lambda: sequence_bounds(position_ids))


def _row_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   row: list[tuple[int, int, int, int]], dropout: float, scaling: float | None,
                   window: int | None = None) -> torch.Tensor:
    """Attention of one packed row (batch 1) given its sequences' bounds, which tile the row in order; with a
    sliding `window`, a token sees only the keys less than `window` positions before it (transformers' rule).

    The row is cut with `split`, not by indexing: the backward of an index is a zero-filled tensor of the whole
    row per sequence (measured: a tenth of a training step went to filling and adding them); that of `split`
    is one concatenation."""
    sizes = [e - s for s, e, _, _ in row]
    qs, ks, vs = query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2)
    index = {s: i for i, (s, _, _, _) in enumerate(row)}
    out = []
    for i, (s, e, ps, pe) in enumerate(row):
        # a branch sees the root's first p = pe - ps tokens (the shared prefix, positions 0..p-1) as well
        p, n = pe - ps, e - s
        k = ks[i] if p == 0 else torch.cat([ks[index[ps]][:, :, :p], ks[i]], dim=2)
        v = vs[i] if p == 0 else torch.cat([vs[index[ps]][:, :, :p], vs[i]], dim=2)
        if window is None and p == 0:
            out.append(F.scaled_dot_product_attention(qs[i], k, v, dropout_p=dropout, is_causal=True, scale=scaling))
            continue
        # by positions: the queries are at p..p+n-1, the keys at 0..p+n-1
        behind = torch.arange(p, p + n, device=query.device)[:, None] - torch.arange(p + n, device=query.device)
        mask = (behind >= 0) if window is None else (behind >= 0) & (behind < window)
        out.append(F.scaled_dot_product_attention(qs[i], k, v, attn_mask=mask, dropout_p=dropout, scale=scaling))
    return torch.cat(out, dim=2)


def varlen_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (batch, heads, q_len, dim), key/value (batch, kv_heads, kv_len, dim) -> (batch, q_len, heads, dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = (attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2]
              and position_ids.shape[-1] == query.shape[2])
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{NAME}: attention logit soft-capping is not supported; use eager attention")
    dtype = query.dtype
    half = (torch.bfloat16, torch.float16)
    upcast = query.device.type == "cpu" and (dtype in half or torch.is_autocast_enabled("cpu"))
    if upcast:
        # measured on torch 2.13 CPU: half-precision SDPA compiles a kernel for every new sequence length, so
        # over varying lengths it is slower than float32 (300 new lengths, forward and backward: 2.3 s vs 1.25 s)
        # and caches those kernels (5.8 MB per length; 16 lengths at most under memory.bound_kernel_caches).
        # Under autocast the inputs often arrive as float32 already (Llama's rotary embedding promotes them), but
        # autocast would cast them to half precision inside SDPA: it is off around the call.
        query, key, value = query.float(), key.float(), value.float()
    out = _packed_attention(query, key, value, position_ids, dropout, scaling, kwargs.get("sliding_window"), upcast)
    return (out.to(dtype) if upcast else out).contiguous(), None


# Eager under torch.compile (the projections around it still compile): the sequences are data that the loop
# runs over, and the bounds cache is Python state that a traced graph would freeze into constants.
@torch.compiler.disable
def _packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor,
                      dropout: float, scaling: float | None, window: int | None, upcast: bool) -> torch.Tensor:
    """(batch, heads, len, dim) inputs -> (batch, len, heads, dim)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    if position_ids.shape[0] not in (1, query.shape[0]):
        raise ValueError(f"{NAME}: position_ids has {position_ids.shape[0]} rows for a batch of {query.shape[0]}")
    bounds = _bounds_once_per_forward(position_ids)
    if len(bounds) == 1:  # one row of positions shared by the whole batch
        bounds = bounds * query.shape[0]
    if window is not None and max(e - s + pe - ps for row in bounds for s, e, ps, pe in row) <= window:
        window = None  # no sequence reaches past the window: plain causal attention is the same
    flash = _flash_dtype(query, scaling)
    if flash is not None and dropout == 0 and (window is None or _window_rule(query.device, flash)):
        layout = _once_per_forward(position_ids, ("layout", query.shape[0]),
                                   lambda: _varlen_layout(bounds, query.shape[2], query.device))
        if layout.keys is None or _prefix_aligned(query.device, flash):  # no branches, or the kernel takes them
            return _flash_rows(query, key, value, layout, scaling, flash, window)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    with torch.autocast(query.device.type, enabled=False) if upcast else nullcontext():
        for q, k, v, row in zip(query.split(1), key.split(1), value.split(1), bounds, strict=True):
            rows.append(_row_attention(q, k, v, row, dropout, scaling, window))
    return torch.cat(rows).transpose(1, 2)


@cache
def _varlen_kernel() -> tuple[Any, dict, set[str]] | None:
    """torch's flash-attention varlen function, the keyword that makes it causal, and the names of its optional
    parameters; None before torch 2.10. torch 2.10 spells causal `is_causal=True`, later ones
    `window_size=(-1, 0)`."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = set(inspect.signature(varlen_attn).parameters)
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, causal, params


def _flash_dtype(query: torch.Tensor, scaling: float | None) -> torch.dtype | None:
    """The half-precision dtype in which the varlen kernel would run this attention, or None where it cannot:
    not on an NVIDIA GPU of compute capability 8 or more (ROCm builds, whose kernel support differs, keep the
    per-sequence path), torch < 2.10, float32 without autocast, heads wider than 256, or a scaling other than
    1/sqrt(dim) where the kernel takes none."""
    kernel = _varlen_kernel()
    if (kernel is None or not query.is_cuda or torch.version.hip is not None
            or torch.cuda.get_device_capability(query.device)[0] < 8):
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    dim = query.shape[-1]
    default_scale = scaling is None or abs(scaling - dim ** -0.5) < 1e-6
    if dtype not in (torch.bfloat16, torch.float16) or dim > 256 or not ("scale" in kernel[2] or default_scale):
        return None
    return dtype


class _Layout(NamedTuple):
    """Where each packed sequence's queries and keys lie in the varlen kernel's (tokens, heads, dim) layout."""

    cu_q: torch.Tensor  # int32 offsets of each sequence's queries
    cu_k: torch.Tensor  # ... of its keys: its shared prefix, if any, then its own tokens
    max_q: int
    max_k: int
    keys: torch.Tensor | None  # the token behind each key (None: the keys are the queries' own tokens)


def _varlen_layout(bounds: list, length: int, device: torch.device) -> _Layout:
    cu_q, cu_k, keys = [0], [0], []
    branched = any(ps < pe for row in bounds for _, _, ps, pe in row)
    for r, row in enumerate(bounds):
        for s, e, ps, pe in row:  # a branch's keys: the root's first pe - ps tokens, then its own
            if branched:
                keys.extend(range(r * length + ps, r * length + pe))
                keys.extend(range(r * length + s, r * length + e))
            cu_q.append(cu_q[-1] + e - s)
            cu_k.append(cu_k[-1] + pe - ps + e - s)
    return _Layout(torch.tensor(cu_q, dtype=torch.int32, device=device),
                   torch.tensor(cu_k, dtype=torch.int32, device=device),
                   max(b - a for a, b in zip(cu_q[:-1], cu_q[1:], strict=True)),
                   max(b - a for a, b in zip(cu_k[:-1], cu_k[1:], strict=True)),
                   torch.tensor(keys, device=device) if branched else None)


def _flash_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: _Layout,
                scaling: float | None, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """All rows' sequences in one varlen call: (batch, heads, len, dim) -> (batch, len, heads, dim). A branch
    gets its shared prefix's keys gathered in front of its own; its queries then see them all, and their own
    keys causally, by the kernel's bottom-right alignment (see `_prefix_aligned`). A sliding `window` goes to the
    kernel as `window_size=(window - 1, 0)` (see `_window_rule`)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    varlen_attn, causal, params = _varlen_kernel()
    batch, heads, length, dim = query.shape
    extra = {"scale": scaling} if "scale" in params and scaling is not None else {}
    if key.shape[1] != heads:
        if "enable_gqa" in params:  # the kernel reads each key/value head for its group of query heads
            extra["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // key.shape[1])
    # the kernel's layout, (tokens, heads, dim): a view where the projections' (batch, len, heads, dim) is kept
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim).to(dtype) for t in (query, key, value))
    if layout.keys is not None:
        k, v = k.index_select(0, layout.keys), v.index_select(0, layout.keys)
    mask = causal if window is None else {"window_size": (window - 1, 0)}
    out = varlen_attn(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, **mask, **extra)
    return out.view(batch, length, heads, dim)


def _kernel_gives(mask: list[list[bool]], device: torch.device, dtype: torch.dtype, **kwargs: Any) -> bool:
    """Whether the varlen kernel, called with `kwargs` on one tiny sequence of len(mask) queries and
    len(mask[0]) keys, computes SDPA with `mask` written out (to half-precision rounding)."""
    varlen_attn = _varlen_kernel()[0]
    (n, m), g = (len(mask), len(mask[0])), torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(length, 1, 16, generator=g).to(device, dtype) for length in (n, m, m))
    offsets = [torch.tensor([0, length], dtype=torch.int32, device=device) for length in (n, m)]
    out = varlen_attn(q, k, v, *offsets, n, m, **kwargs)
    ref = F.scaled_dot_product_attention(*(t.transpose(0, 1).float() for t in (q, k, v)),
                                         attn_mask=torch.tensor(mask, device=device))
    return torch.allclose(out.float(), ref.transpose(0, 1), atol=2e-2)


@cache
def _prefix_aligned(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the varlen kernel aligns its causal mask to the bottom right when a sequence has more keys than
    queries (flash-attention's rule since 2.1): query i of n then sees the first k - n + i + 1 of k keys, which
    is what a branch's shared prefix needs. torch's varlen API is new, so this is checked once per process on
    a tiny input; where it does not hold, branches take the per-sequence path."""
    return _kernel_gives([[True, True, False], [True, True, True]], device, dtype, **_varlen_kernel()[1])


@cache
def _window_rule(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the varlen kernel, given `window_size=(w - 1, 0)`, lets a query see exactly the keys fewer than w
    positions behind it (transformers' sliding window), aligned to the bottom right where a sequence has more keys
    than queries (a branch's shared prefix): flash-attention's documented rule, checked once per process on a
    tiny input, as `_prefix_aligned` checks the causal one. torch 2.10's kernel takes no window; there, or where
    this does not hold, windowed rows take the per-sequence path."""
    if "window_size" not in _varlen_kernel()[2]:
        return False
    # a window of 2 over 2 queries and 4 keys: each query sees its own key and the one before
    return _kernel_gives([[False, True, True, False], [False, False, True, True]], device, dtype, window_size=(1, 0))


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
