"""Triton kernels for decode attention over per-head KV segments and for compaction into them.

Imported only when the Triton backend is chosen (see :mod:`kvbench.kernels`). Triton reads
``TRITON_INTERPRET`` when a kernel is *defined*, so whether these kernels run compiled on CUDA or in
Triton's interpreter (CPU tensors, used by the tests) is fixed when this module is first imported,
and recorded in :data:`INTERPRETED`. The interpreter also needs Triton's own library functions
(``tl.zeros``, ...) defined in interpreter mode, i.e. ``TRITON_INTERPRET=1`` set before ``triton``
itself was first imported (transformers may import it early), and set again while kernels run;
:func:`interpreter_problem` says when that does not hold.

Limits: head dim ``D <= 256``, GQA group ``G <= 64``; keys and values share ``D``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton import knobs

from kvbench.kernels.reference import segment_sizes

INTERPRETED: bool = bool(knobs.runtime.interpret)
_LIBRARY_INTERPRETED: bool = type(tl.zeros).__name__ == "InterpretedFunction"
MAX_HEAD_DIM = 256
MAX_GROUP = 64
BLOCK_N = 64  # cache entries per inner step of decode attention
BLOCK_L = 64  # entries per program of compaction
LOG2E = 1 / math.log(2)  # softmax runs in base 2: exp(x) = exp2(x * LOG2E)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with a float32 accumulator. ``UPCAST`` multiplies in float32 instead: Triton's
    interpreter stores bfloat16 as uint16 and its ``tl.dot`` multiplies those bit patterns
    (triton-lang/triton#11584), while bfloat16 products are exact in float32, so upcasting gives
    what the GPU's bfloat16 dot gives, up to summation order."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, length_ptr, valid_ptr,
    mid_m_ptr, mid_l_ptr, mid_acc_ptr,
    heads, group, seq_len, split_len, num_splits, qk_scale, head_dim,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_valid_b, stride_valid_h, stride_valid_n,
    PACKED: tl.constexpr, HAS_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial attention of one KV segment's split for all G query heads of its group.

    Flash-decoding: with a single query token there is no query-length dimension to parallelise
    over, so one program per segment would leave most of a GPU idle on long contexts. The grid is
    (segments × splits); each program walks its split of the segment ``BLOCK_N`` entries at a time
    with an online softmax (running max ``m``, running sum ``l``, unnormalised ``acc``, all float32,
    in the base-2 domain) and writes them for :func:`_decode_combine_kernel` to merge. Each K/V
    block is loaded once and used by all G query heads of the KV head (a ``(G, D) x (D, BLOCK_N)``
    dot, G padded to ``BLOCK_G``), so GQA costs no extra memory traffic. Only the segment's real
    entries are loaded: rows past ``length`` (packed) or with ``valid`` False (padded) are masked
    out of every load, so slack or padding — whatever it holds, NaN included — never reaches the
    arithmetic.
    """
    seg = tl.program_id(0)
    split = tl.program_id(1)
    b = seg // heads
    h = seg % heads
    if PACKED:
        n = tl.load(length_ptr + seg).to(tl.int32)
        first = tl.load(start_ptr + seg).to(tl.int64)
        k_base = k_ptr + first * stride_kn
        v_base = v_ptr + first * stride_vn
    else:
        n = seq_len
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    lo = split * split_len
    hi = tl.minimum(lo + split_len, n)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < group
    d_mask = offs_d < head_dim
    q_rows = h * group + offs_g
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + q_rows[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    )

    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for block in range(lo, hi, BLOCK_N):
        offs_n = block + tl.arange(0, BLOCK_N)
        real = offs_n < hi
        if HAS_VALID:
            flags = tl.load(
                valid_ptr + b.to(tl.int64) * stride_valid_b + h * stride_valid_h + offs_n * stride_valid_n,
                mask=real, other=0,
            )
            real = real & (flags != 0)
        kv_mask = real[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        scores = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale
        scores = tl.where(real[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        # A block (or split) with no real entry keeps m at -inf; shift by 0 there to avoid inf - inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_shift)
        p = tl.exp2(scores - m_shift[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
        m = m_new

    mid_rows = seg * group + offs_g
    tl.store(mid_m_ptr + mid_rows * num_splits + split, m, mask=g_mask)
    tl.store(mid_l_ptr + mid_rows * num_splits + split, l, mask=g_mask)
    tl.store(
        mid_acc_ptr + (mid_rows[:, None] * num_splits + split) * head_dim + offs_d[None, :],
        acc, mask=g_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _decode_combine_kernel(
    mid_m_ptr, mid_l_ptr, mid_acc_ptr, length_ptr, out_ptr,
    query_heads, group, seq_len, split_len, num_splits, head_dim,
    stride_ob, stride_oh, stride_od,
    PACKED: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the splits of one query head into its output row.

    The partial softmaxes were taken against different maxima; rescaling each by
    ``2^(m_j - max_j m_j)`` puts them on a common one, after which sums and weighted values add up
    (the same algebra as the online softmax, applied across splits). Only splits that start inside
    the segment are read. A head with no real entry (length 0, or nothing valid) outputs zeros.
    """
    row = tl.program_id(0)
    seg = row // group
    if PACKED:
        n = tl.load(length_ptr + seg).to(tl.int32)
    else:
        n = seq_len
    active = tl.cdiv(n, split_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim

    m = tl.full((1,), float("-inf"), tl.float32)
    l = tl.zeros((1,), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for split in range(0, active):
        m_j = tl.load(mid_m_ptr + row * num_splits + split)
        l_j = tl.load(mid_l_ptr + row * num_splits + split)
        acc_j = tl.load(mid_acc_ptr + (row * num_splits + split) * head_dim + offs_d, mask=d_mask, other=0.0)
        m_new = tl.maximum(m, m_j)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        old = tl.exp2(m - m_shift)
        new = tl.exp2(m_j - m_shift)
        l = l * old + l_j * new
        acc = acc * old + acc_j * new
        m = m_new

    out = tl.where(l > 0, acc / tl.where(l > 0, l, 1.0), 0.0)
    b = row // query_heads
    hq = row % query_heads
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + hq * stride_oh + offs_d * stride_od, out, mask=d_mask)


def interpreter_problem() -> str | None:
    """Why the interpreted kernels cannot run now, or None (also None for compiled kernels)."""
    if not INTERPRETED:
        return None
    if not _LIBRARY_INTERPRETED:
        return "triton was imported before TRITON_INTERPRET=1 was set; set it before anything imports triton"
    if not knobs.runtime.interpret:
        return "the kernels were defined for Triton's interpreter but TRITON_INTERPRET=1 is no longer set"
    return None


def _check_interpreter() -> None:
    problem = interpreter_problem()
    if problem is not None:
        raise RuntimeError(f"Triton interpreter: {problem}")


def _check_decode(q: torch.Tensor, head_dim: int, group: int) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be (B, Hq, D), got shape {tuple(q.shape)}")
    if q.shape[-1] != head_dim:
        raise ValueError(f"q has head dim {q.shape[-1]} but keys have {head_dim}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} exceeds the Triton kernel's limit {MAX_HEAD_DIM}")
    if not 1 <= group <= MAX_GROUP or q.shape[1] % group:
        raise ValueError(f"GQA group {group} must divide {q.shape[1]} query heads and be <= {MAX_GROUP}")


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision dots (the default would round them to tf32 on tensor cores)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _split_len(max_len: int, segments: int, device: torch.device) -> int:
    """Entries per split: enough splits that (segments × splits) fills the GPU about twice over,
    never a split shorter than one block."""
    blocks = max(1, triton.cdiv(max_len, BLOCK_N))
    units = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = min(blocks, max(1, triton.cdiv(2 * units, segments)))
    return triton.cdiv(blocks, splits) * BLOCK_N


def _decode(
    q, keys, values, start, length, valid, group, scale, seq_len, max_len, split_len, packed,
) -> torch.Tensor:
    _check_interpreter()
    batch, query_heads, head_dim = q.shape
    heads = query_heads // group
    segments = batch * heads
    out = torch.empty_like(q)
    if split_len is None:
        split_len = _split_len(max_len, segments, q.device)
    elif split_len <= 0 or split_len % BLOCK_N:
        raise ValueError(f"split_len must be a positive multiple of {BLOCK_N}, got {split_len}")
    num_splits = max(1, triton.cdiv(max_len, split_len))
    rows = batch * query_heads
    mid_m = torch.empty((rows, num_splits), dtype=torch.float32, device=q.device)
    mid_l = torch.empty_like(mid_m)
    mid_acc = torch.empty((rows, num_splits, head_dim), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g = max(16, triton.next_power_of_2(group))
    dummy = length if packed else q  # an unused pointer argument still needs a tensor
    if packed:
        k_strides = (0, 0, keys.stride(0), keys.stride(1))
        v_strides = (0, 0, values.stride(0), values.stride(1))
    else:
        k_strides, v_strides = keys.stride(), values.stride()
    valid_strides = valid.stride() if valid is not None else (0, 0, 0)
    _decode_split_kernel[(segments, num_splits)](
        q, keys, values, start if packed else dummy, length if packed else dummy,
        valid.view(torch.uint8) if valid is not None else dummy,
        mid_m, mid_l, mid_acc,
        heads, group, seq_len, split_len, num_splits, scale * LOG2E, head_dim,
        *q.stride(), *k_strides, *v_strides, *valid_strides,
        PACKED=packed, HAS_VALID=valid is not None, DOT_PRECISION=_dot_precision(q.dtype),
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        BLOCK_G=block_g, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
    )
    _decode_combine_kernel[(rows,)](
        mid_m, mid_l, mid_acc, length if packed else dummy, out,
        query_heads, group, seq_len, split_len, num_splits, head_dim,
        *out.stride(),
        PACKED=packed, BLOCK_D=block_d,
    )
    return out


def decode_attention_packed(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    group: int,
    scale: float,
    *,
    max_length: int | None = None,
    split_len: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`kvbench.kernels.reference.decode_attention_packed`.

    ``max_length`` bounds ``length`` (it sizes the grid); without it ``length.max()`` is read back
    from the device, one synchronisation per call. ``split_len`` (a multiple of ``BLOCK_N``) fixes
    the entries per split instead of the occupancy heuristic.
    """
    _check_decode(q, keys.shape[-1], group)
    if start.shape != length.shape or start.numel() != q.shape[0] * (q.shape[1] // group):
        raise ValueError(f"start and length must be (B*H,) = ({q.shape[0] * (q.shape[1] // group)},)")
    if max_length is None:
        max_length = int(length.max()) if length.numel() else 0
    return _decode(q, keys, values, start, length, None, group, scale, 0, max_length, split_len, True)


def decode_attention_padded(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
    *,
    split_len: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`kvbench.kernels.reference.decode_attention_padded`."""
    batch, heads, seq_len, head_dim = keys.shape
    if q.dim() != 3 or q.shape[0] != batch or q.shape[1] % heads:
        raise ValueError(f"q must be (B, H * G, D) for keys {tuple(keys.shape)}, got {tuple(q.shape)}")
    _check_decode(q, head_dim, q.shape[1] // heads)
    if valid is not None and valid.shape != keys.shape[:3]:
        raise ValueError(f"valid must be (B, H, L) = {tuple(keys.shape[:3])}, got {tuple(valid.shape)}")
    group = q.shape[1] // heads
    return _decode(q, keys, values, None, None, valid, group, scale, seq_len, seq_len, split_len, False)


@triton.jit
def _compact_kernel(
    k_ptr, v_ptr, kept_ptr, rank_ptr, start_ptr, out_k_ptr, out_v_ptr,
    heads, seq_len, head_dim,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ok, stride_ov,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Scatter one block of one head's kept entries to their packed rows.

    The destination of a kept entry is its segment's start plus its rank among the head's kept
    entries (an exclusive prefix count, computed beforehand with ``torch.cumsum``), so every block
    of every head is independent: one launch over (heads × blocks) replaces a per-head gather, and
    keys and values move in the same pass. Entries not kept are never loaded.
    """
    seg = tl.program_id(0)
    block = tl.program_id(1)
    b = seg // heads
    h = seg % heads
    offs_l = block * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    flat = seg.to(tl.int64) * seq_len + offs_l
    kept = tl.load(kept_ptr + flat, mask=offs_l < seq_len, other=0) != 0
    rank = tl.load(rank_ptr + flat, mask=kept, other=0)
    dest = tl.load(start_ptr + seg).to(tl.int64) + rank.to(tl.int64)
    mask = kept[:, None] & d_mask[None, :]
    k_src = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_src = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    k = tl.load(k_src + offs_l[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_src + offs_l[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask)
    tl.store(out_k_ptr + dest[:, None] * stride_ok + offs_d[None, :], k, mask=mask)
    tl.store(out_v_ptr + dest[:, None] * stride_ov + offs_d[None, :], v, mask=mask)


def compact(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    slack: int,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of :func:`kvbench.kernels.reference.compact`."""
    _check_interpreter()
    if slack < 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    if keys.shape != values.shape or keep.shape != keys.shape[:3]:
        raise ValueError("keys and values must be (B, H, L, D) and keep (B, H, L)")
    batch, heads, seq_len, head_dim = keys.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} exceeds the Triton kernel's limit {MAX_HEAD_DIM}")
    start, length, capacity = segment_sizes(keep, valid, slack)
    kept = (keep if valid is None else keep & valid).flatten(0, 1).contiguous()
    rank = torch.cumsum(kept, -1, dtype=torch.int32) - 1
    total = int(capacity.sum())
    packed_keys = keys.new_empty((total, head_dim))
    packed_values = values.new_empty((total, head_dim))
    if seq_len and batch * heads:
        _compact_kernel[(batch * heads, triton.cdiv(seq_len, BLOCK_L))](
            keys, values, kept.view(torch.uint8), rank, start, packed_keys, packed_values,
            heads, seq_len, head_dim, *keys.stride(), *values.stride(),
            packed_keys.stride(0), packed_values.stride(0),
            BLOCK_L=BLOCK_L, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        )
    return packed_keys, packed_values, start, length, capacity

