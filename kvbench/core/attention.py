"""Attention over an evicted cache, and the attention rows methods recompute for scoring.

kvbench registers one attention function with transformers' ``AttentionInterface``. It differs from
SDPA in two ways: the causal mask is aligned to the *end* of the cache (query ``i`` of ``q`` new
tokens sees the first ``L - q + i + 1`` cache entries), which is right whatever was evicted before,
whereas transformers' own masks derive from positions, which stop matching cache indices once
entries are gone; and padded slots of a non-uniform padded layout (``layer.valid``) are hidden. A
packed layer (:mod:`kvbench.core.packed`) computes its own attention over its per-head segments
(``layer.attend``), since its buffer is not a ``(B, H, L, D)`` tensor once heads differ. The engine
hands the cache over as the ``kvbench_cache`` keyword, which transformers passes through to the
attention function. A sliding-window layer (``sliding_window``, which the model passes) adds the
band of :func:`kvbench.core.sliding.band_mask`. Batch size is 1 (kvbench compresses one context at
a time), so there is no padding mask to honour.

One query token over the cache (decoding) can run through one of kvbench's decode kernels instead
of SDPA: the cache's ``decode_kernels`` (set by the session) names the backend. On the padded
layout ``"sdpa"`` runs the masked SDPA, ``"auto"`` (default) too on CUDA but on the CPU two batched
matmuls in float32 (:mod:`kvbench.kernels.grouped`: CPU SDPA is slow for one query), ``"triton"``
and ``"torch"`` the :mod:`kvbench.kernels` backend, which reads the padded layout with its validity
mask directly; the packed layout runs the Triton kernel for ``"triton"`` and for ``"auto"`` on CUDA,
else SDPA per head.

SDPA and flash attention return no probabilities, so methods that score with attention recompute
only the rows they need (:func:`attention_rows`) from queries rebuilt out of the recorded attention
inputs (:func:`project_queries`).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel

from kvbench.core.sliding import band_mask
from kvbench.kernels import BACKENDS as KERNEL_BACKENDS
from kvbench.kernels import decode_attention_padded
from kvbench.kernels.grouped import decode_attention_grouped

ATTENTION_NAME = "kvbench"
DECODE_KERNELS = ("sdpa", *KERNEL_BACKENDS)  # what one decoded token's attention may run through


def end_aligned_causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(q_len, kv_len)`` mask, True where query ``i`` may see entry ``j``."""
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    return torch.arange(kv_len, device=device).unsqueeze(0) <= rows


def kvbench_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query (B, Hq, q, D)`` over ``key/value (B, Hkv, L, D)``; returns ``(B, q, Hq, D)``.
    ``scaling`` is the model's own (Gemma 3's is ``query_pre_attn_scalar ** -0.5``)."""
    cache = kwargs.get("kvbench_cache")
    layer = cache.layers[module.layer_idx] if cache is not None else None
    if getattr(layer, "attend", None) is not None:  # the packed layout reads its own buffer
        return layer.attend(query, scaling, getattr(cache, "decode_kernels", None)).contiguous(), None
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if sliding_window is not None and kv_len > sliding_window:
        mask = band_mask(q_len, kv_len, sliding_window, query.device)
    else:
        mask = None if q_len == 1 else end_aligned_causal_mask(q_len, kv_len, query.device)
    valid = layer.valid if layer is not None else None
    backend = getattr(cache, "decode_kernels", "auto")
    if q_len == 1 and mask is None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if backend in ("triton", "torch"):  # an explicit kernel
            return decode_attention_padded(query[:, :, 0], key, value, valid, scale, backend).unsqueeze(1), None
        if backend == "auto" and query.device.type == "cpu":  # CPU SDPA is slow for one query token
            return decode_attention_grouped(query[:, :, 0], key, value, valid, scale).unsqueeze(1), None
    if valid is not None:
        per_query_head = valid.repeat_interleave(query.shape[1] // key.shape[1], dim=1).unsqueeze(2)
        mask = per_query_head if mask is None else per_query_head & mask
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, kvbench_attention)


def install(model: PreTrainedModel) -> None:
    """Route the model's attention through :func:`kvbench_attention`."""
    model.set_attn_implementation(ATTENTION_NAME)


def layer_rotaries(model: PreTrainedModel) -> list:
    """Each decoder layer's rotary embedding, ``rotary(x, position_ids) -> (cos, sin)``, or None.

    Gemma 3's one module holds a table per layer type (local layers base 10K, global 1M) and takes
    the type as an argument; the others use one table for every layer.
    """
    config = model.config
    emb = getattr(model.model, "rotary_emb", None)
    if emb is None:
        return [None] * config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is not None and "layer_type" in inspect.signature(emb.forward).parameters:
        return [functools.partial(emb, layer_type=kind) for kind in types]
    return [emb] * config.num_hidden_layers


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (B, H, n, D)`` by ``cos/sin (B, n, R)`` as Llama/Qwen/Gemma do; with ``R < D``
    (Phi-3's partial rotary factor) only the first ``R`` channels turn, as Phi-3's own code does."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        turned, passed = x[..., :rotary], x[..., rotary:]
        return torch.cat([turned * cos + rotate_half(turned) * sin, passed], dim=-1)
    return x * cos + rotate_half(x) * sin


def _projection(attn: nn.Module, which: str, hidden: torch.Tensor) -> torch.Tensor:
    """``which`` ("q", "k" or "v") projection of ``hidden``: the layer's own ``q_proj``..., or the
    matching rows of a fused ``qkv_proj`` (Phi-3: queries, then keys, then values)."""
    if hasattr(attn, f"{which}_proj"):
        return getattr(attn, f"{which}_proj")(hidden)
    fused = getattr(attn, "qkv_proj", None)
    if fused is None:
        raise ValueError(f"{type(attn).__name__} has neither {which}_proj nor a fused qkv_proj")
    q_rows = attn.config.num_attention_heads * attn.head_dim
    kv_rows = attn.config.num_key_value_heads * attn.head_dim
    bounds = {"q": (0, q_rows), "k": (q_rows, q_rows + kv_rows), "v": (q_rows + kv_rows, q_rows + 2 * kv_rows)}
    start, stop = bounds[which]
    bias = None if fused.bias is None else fused.bias[start:stop]
    return F.linear(hidden, fused.weight[start:stop], bias)


def _project_heads(attn: nn.Module, which: str, norm: nn.Module | None, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden (B, n, d)`` → per-head ``(B, H, n, D)``: projection, then the per-head RMSNorm
    that Qwen3 and Gemma 3 apply before RoPE (``norm`` None for Llama/Qwen2/Mistral/Phi-3)."""
    batch, n, _ = hidden.shape
    heads = _projection(attn, which, hidden).view(batch, n, -1, attn.head_dim)
    if norm is not None:
        heads = norm(heads)
    return heads.transpose(1, 2)


def prerope_queries(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Queries ``(B, Hq, n, D)`` before RoPE: projection, then ``q_norm`` where the layer has one."""
    return _project_heads(attn, "q", getattr(attn, "q_norm", None), hidden)


def prerope_keys(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Keys ``(B, Hkv, n, D)`` before RoPE (leverage scores read the keys' geometry without it)."""
    return _project_heads(attn, "k", getattr(attn, "k_norm", None), hidden)


def project_queries(
    attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Rebuild post-RoPE queries ``(B, Hq, n, D)`` from attention inputs ``hidden (B, n, d)``.

    Follows Llama/Qwen2/Qwen3/Gemma 3/Mistral/Phi-3: projection (rows of a fused ``qkv_proj``), per-head
    RMSNorm where the layer has ``q_norm`` (Qwen3, Gemma 3), then RoPE at the positions ``cos/sin`` were built for.
    """
    return apply_rope(prerope_queries(attn, hidden), cos, sin)


def project_keys_values(
    attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute cached keys (post-RoPE) and values ``(B, Hkv, n, D)`` from attention inputs
    ``hidden (B, n, d)``, exactly as the model's attention computes them before ``cache.update``."""
    k = prerope_keys(attn, hidden)
    v = _project_heads(attn, "v", None, hidden)
    return apply_rope(k, cos, sin), v


def attention_rows(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    first_query_index: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities ``(B, Hq, n, T)`` of ``n`` queries over all ``T`` keys.

    Query ``i`` sits at cache index ``first_query_index + i`` and sees keys up to and including it.
    GQA: query head ``h`` reads KV head ``h // group``. Computed in float32; the cost is ``n x T``
    per head, so callers pass a window of queries, never all ``T``. ``valid (B, Hkv, T)`` hides the
    padded slots of a non-uniform layout.
    """
    batch, q_heads, n, dim = queries.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    q = queries.float().view(batch, kv_heads, group, n, dim)
    logits = torch.matmul(q, keys.float().unsqueeze(2).transpose(-1, -2)) * scaling
    visible = end_aligned_causal_mask(n, first_query_index + n, keys.device)
    visible = F.pad(visible, (0, total - visible.shape[1]), value=False)
    if valid is not None:
        visible = visible & valid.unsqueeze(2).unsqueeze(2)  # (B, Hkv, 1, 1, T)
    logits = logits.masked_fill(~visible, float("-inf"))
    return logits.softmax(dim=-1).view(batch, q_heads, n, total)


def reduce_group(scores: torch.Tensor, kv_heads: int, how: str = "mean") -> torch.Tensor:
    """Fold per-query-head scores ``(B, Hq, T)`` onto their KV heads ``(B, Hkv, T)``."""
    batch, q_heads, total = scores.shape
    grouped = scores.view(batch, kv_heads, q_heads // kv_heads, total)
    return grouped.amax(dim=2) if how == "max" else grouped.mean(dim=2)


def average_rope(rotary, like: torch.Tensor, start: int, count: int, head_dim: int) -> torch.Tensor:
    """The RoPE rotation matrix ``(D, D)`` averaged over positions ``start..start+count-1``: how
    methods that predict future queries (Expected Attention, CAPKV) rotate a query statistic.
    ``rotary`` is the model's rotary embedding; the matrix is in ``like``'s dtype."""
    positions = torch.arange(start, start + count, device=like.device).unsqueeze(0)
    cos, sin = rotary(like, positions)
    cos, sin = cos[0], sin[0]
    half = head_dim // 2
    eye = torch.eye(head_dim, device=cos.device, dtype=cos.dtype)
    swap = torch.zeros(head_dim, head_dim, device=cos.device, dtype=cos.dtype)
    swap[half:, :half], swap[:half, half:] = torch.eye(half), -torch.eye(half)  # rotate_half as a matrix
    return (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * swap).mean(dim=0)
