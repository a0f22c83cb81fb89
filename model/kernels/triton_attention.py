"""Attention of new tokens over a fixed-capacity KV cache, reading only the slots in use
(reference: reference.decode_attention): decode steps, and prefill chunks written into the cache.

The model's cache holds max_seq_len slots per row and its graphs are static, so a plain attention call reads the
whole capacity every step (masked past each row's position): at `small`'s 8448 slots, batch 32, that is 3.3 GB per
decode step. Here each program loads its row's positions and loops only over the slots up to the furthest of them,
so a step reads what the rows hold, inside the same static graph (the bound is data in device memory).

Split over the sequence (flash-decoding): program (row and KV head, split, block of query rows) covers 1/NSPLIT
of the live blocks its query rows see, with an online softmax (base 2), and writes its unnormalised output, running
max and sum; a second kernel combines the splits (with one split the program writes its output itself). The query
heads that share a KV head are query rows of one program while they fit its registers (a decode step: each KV
block is read once); a prefill chunk's many rows take blocks of rows, each reading the slots up to its own last
position (causal, without a mask over the cache), the blocks of the last rows launched first. Long chunks' blocks
(64 rows) run the slots before their first position in a loop without masks. launch.attention_launch has the
blocks and what they measured.

Checked against the reference in Triton's interpreter (float32); bfloat16 and the timing against the whole-cache
attention (bench.kernels, decode_attention) are for the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import attention_launch, combine_blocks, dot_block
from .triton_pdl import after_predecessors, waits


@triton.jit
def _live_blocks(pos, BLOCK: tl.constexpr, NSPLIT: tl.constexpr):
    """(live slots, blocks of them, blocks per split) of a block of query rows at positions `pos`: the split of
    the live blocks the attention kernel runs and the combine reads back."""
    live = tl.max(pos, axis=0) + 1
    n_blocks = tl.cdiv(live, BLOCK)
    return live, n_blocks, tl.cdiv(n_blocks, NSPLIT)


@triton.jit
def _attend_block(qt, k_base, v_base, blk, pos, live, cols, col_ok, m, l, acc, stride_ks, stride_vs,
                  BLOCK: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """One block of slots into a block of query rows' online softmax (base-2: m and the scores in log2 units).
    MASKED: the block reaches past some row's position or past the live slots; the blocks before need neither
    mask."""
    slots = blk * BLOCK + tl.arange(0, BLOCK)
    kv_ok = ((slots < live)[:, None] & col_ok[None, :]) if MASKED else col_ok[None, :]
    kt = tl.load(k_base + slots[:, None] * stride_ks + cols[None, :], mask=kv_ok, other=0.0)
    scores = tl.dot(qt, tl.trans(kt), input_precision=PREC) * 1.4426950408889634     # log2(e): exp2 below
    if MASKED:
        scores = tl.where(slots[None, :] <= pos[:, None], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    # A row with nothing visible yet keeps m = -inf: shift by 0 so that exp2 gives 0, not NaN.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - shift[:, None])
    alpha = tl.exp2(m - shift)
    vt = tl.load(v_base + slots[:, None] * stride_vs + cols[None, :], mask=kv_ok, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
    return m_new, l * alpha + tl.sum(p, axis=1), acc


@triton.jit
def decode_attention_kernel(
    q, key_cache, value_cache, positions, out, acc_out, max_out, sum_out,
    R, T,
    stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_pb, stride_pt, stride_ob, stride_oh, stride_or,
    HKV: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    BLOCK: tl.constexpr, WHOLE_BLOCKS: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
):
    """With one split, writes the normalised output to `out`; with more, each split's unnormalised output, max and
    sum to acc_out, max_out and sum_out for combine_splits_kernel."""
    bh = after_predecessors(tl.program_id(0), PDL)
    split = tl.program_id(1)
    # The last blocks of a prefill chunk's query rows see the most slots: launched first, they leave no long
    # program for the end.
    row_block = tl.num_programs(2) - 1 - tl.program_id(2)
    b = (bh // HKV).to(tl.int64)
    h = bh % HKV
    rows = row_block * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    row_ok = rows < R
    col_ok = cols < D
    # Query row r is query head (r // T) of this KV head's group at step r % T, which may see slots <= its position.
    pos = tl.load(positions + b * stride_pb + (rows % T) * stride_pt, mask=row_ok, other=-1)
    live, n_blocks, per_split = _live_blocks(pos, BLOCK, NSPLIT)
    first = split * per_split
    last = tl.minimum(first + per_split, n_blocks)

    qt = tl.load(q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qr + cols[None, :],
                 mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    # 1/sqrt(D) as a float32 tensor: a Python float argument reaches Inductor-compiled graphs as float64.
    qt = (qt.to(tl.float32) * tl.rsqrt(tl.full([], D, tl.float32))).to(key_cache.dtype.element_ty)
    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    k_base = key_cache + b * stride_kb + h * stride_kh
    v_base = value_cache + b * stride_vb + h * stride_vh
    whole = first
    if WHOLE_BLOCKS:   # blocks wholly at or before every row's position need no mask: a prefill's all but the last
        whole = tl.minimum(tl.maximum((tl.min(tl.where(row_ok, pos, live), axis=0) + 1) // BLOCK, first), last)
        for blk in range(first, whole):
            m, l, acc = _attend_block(qt, k_base, v_base, blk, pos, live, cols, col_ok, m, l, acc, stride_ks,
                                      stride_vs, BLOCK, False, PREC)
    for blk in range(whole, last):
        m, l, acc = _attend_block(qt, k_base, v_base, blk, pos, live, cols, col_ok, m, l, acc, stride_ks, stride_vs,
                                  BLOCK, True, PREC)
    if NSPLIT == 1:
        l = tl.where(row_ok, l, 1.0)    # padding rows of the block: nothing to normalise
        tl.store(out + b * stride_ob + h * stride_oh + rows[:, None] * stride_or + cols[None, :],
                 (acc / l[:, None]).to(out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        # Outputs [bh, row block, split, BM(, BD)]
        base = (bh * tl.num_programs(2) + row_block) * NSPLIT + split
        local = tl.arange(0, BM)
        tl.store(acc_out + (base * BM + local[:, None]) * BD + cols[None, :], acc)
        tl.store(max_out + base * BM + local, m)
        tl.store(sum_out + base * BM + local, l)


@triton.jit
def combine_splits_kernel(
    acc, run_max, run_sum, positions, out, R, T,
    stride_pb, stride_pt, stride_ob, stride_oh, stride_or,
    HKV: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, SPLITS: tl.constexpr, ALL_SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    """Each split's unnormalised output weighted by exp(its max - the overall max), over the weighted sums; a split
    that saw nothing (max -inf) weighs 0. Program (row and KV head, ROWS of a block of query rows, COLS of the head
    dim). Only the splits the live blocks reached are read, SPLITS of them per load: a loop that read one split at
    a time was a chain of dependent loads in a single program at batch 1 (15 splits took 7.4 us on an H100 at 4096
    slots, 3x the attention kernel before it)."""
    bh = after_predecessors(tl.program_id(0), PDL)
    parts = BM // ROWS
    row_block = tl.program_id(1) // parts
    b = (bh // HKV).to(tl.int64)
    h = bh % HKV
    local = (tl.program_id(1) % parts) * ROWS + tl.arange(0, ROWS)
    rows = row_block * BM + local
    row_ok = rows < R
    cols = tl.program_id(2) * COLS + tl.arange(0, COLS)
    # The attention kernel's split of the live blocks of its BM rows, recomputed: splits at or past `used` covered
    # nothing.
    block_rows = row_block * BM + tl.arange(0, BM)
    pos = tl.load(positions + b * stride_pb + (block_rows % T) * stride_pt, mask=block_rows < R, other=-1)
    _, n_blocks, per_split = _live_blocks(pos, BLOCK, NSPLIT)
    used = tl.cdiv(n_blocks, tl.maximum(per_split, 1))
    base = (bh * (tl.num_programs(1) // parts) + row_block) * NSPLIT
    # The overall max and the weighted sum first, from every split's [ROWS] scalars at once.
    every = tl.arange(0, ALL_SPLITS)
    at = (base + every[:, None]) * BM + local[None, :]
    seen = (every < used)[:, None]
    m_split = tl.load(run_max + at, mask=seen, other=float("-inf"))     # log2 units (the attention kernel's)
    m = tl.max(m_split, axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.load(run_sum + at, mask=seen, other=0.0) * tl.exp2(m_split - shift[None, :]), axis=0)
    o = tl.zeros([ROWS, COLS], tl.float32)
    for first in range(0, used, SPLITS):
        some = first + tl.arange(0, SPLITS)
        at_some = (base + some[:, None]) * BM + local[None, :]
        ok = (some < used)[:, None]
        weight = tl.exp2(tl.load(run_max + at_some, mask=ok, other=float("-inf")) - shift[None, :])
        partial = tl.load(acc + at_some[:, :, None] * BD + cols[None, None, :],
                          mask=(ok & row_ok[None, :])[:, :, None], other=0.0)
        o += tl.sum(partial * weight[:, :, None], axis=0)
    l = tl.where(row_ok, l, 1.0)    # padding rows of the block: nothing to normalise
    tl.store(out + b * stride_ob + h * stride_oh + rows[:, None] * stride_or + cols[None, :],
             (o / l[:, None]).to(out.dtype.element_ty), mask=row_ok[:, None] & (cols < D)[None, :])


def splits(programs_per_split: int, capacity: int, block: int, programs: int = 264) -> int:
    """Sequence splits per (row, KV head, block of query rows): enough programs to fill a GPU (about two per SM of
    an H100) when the rows are long, never more than the capacity has blocks of four."""
    return max(1, min(triton.cdiv(capacity, 4 * block), triton.cdiv(programs, programs_per_split)))


def decode_attention(q, key_cache, value_cache, positions, launch=None):
    """See reference.decode_attention: q [B, Hkv, R, D] (R = query heads per KV head x T steps, head-major);
    caches [B, Hkv, S, D]; positions [B, T]. Returns [B, Hkv, R, D] in q's dtype."""
    B, Hkv, R, D = q.shape
    T = positions.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    BD = dot_block(D)
    config = attention_launch(R, D, key_cache.element_size())
    BM, block = config["BM"], config["BLOCK"]
    row_blocks = triton.cdiv(R, BM)
    nsplit = splits(B * Hkv * row_blocks, key_cache.shape[2], block)
    out = torch.empty(B, Hkv, R, D, dtype=q.dtype, device=q.device)
    # One split writes its output directly; more write partial results that one combine launch merges (where
    # torch's ops were two to six).
    shape = (B * Hkv, row_blocks, nsplit, BM) if nsplit > 1 else (1,)
    acc = torch.empty(*shape, BD, dtype=torch.float32, device=q.device)
    run_max = torch.empty(shape, dtype=torch.float32, device=q.device)
    run_sum = torch.empty(shape, dtype=torch.float32, device=q.device)
    kernel = launch(decode_attention_kernel) if launch else decode_attention_kernel
    kernel[(B * Hkv, nsplit, row_blocks)](
        q, key_cache, value_cache, positions, out, acc, run_max, run_sum, R, T,
        q.stride(0), q.stride(1), q.stride(2), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), positions.stride(0), positions.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        HKV=Hkv, D=D, NSPLIT=nsplit, BD=BD, PREC="ieee" if key_cache.dtype == torch.float32 else "tf32",
        PDL=waits(q.device), **config)
    if nsplit == 1:
        return out
    rows, cols, some = combine_blocks(R, BM, BD, nsplit)
    combine = launch(combine_splits_kernel) if launch else combine_splits_kernel
    combine[(B * Hkv, row_blocks * (BM // rows), BD // cols)](
        acc, run_max, run_sum, positions, out, R, T, positions.stride(0), positions.stride(1), out.stride(0),
        out.stride(1), out.stride(2), HKV=Hkv, D=D, NSPLIT=nsplit, BM=BM, BD=BD, BLOCK=block, ROWS=rows, COLS=cols,
        SPLITS=some, ALL_SPLITS=triton.next_power_of_2(nsplit), PDL=waits(q.device), num_warps=4)
    return out
