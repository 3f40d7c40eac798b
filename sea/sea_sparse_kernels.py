"""Triton kernels of the sparse attention: `sea_attention.sparse_attention` computed without gathering the selected
keys and values into memory, tested against it. The per-query kernel gives each program a block of query rows of one
head, walks their slots, loads the selected key/value rows straight from K and V, and keeps an online softmax in
float32; the block kernel does the same for blocks of queries sharing their key ranges, through matrix products;
the split kernel, for inference without probabilities, reads each row's ranges directly (no per-slot index, no
probability buffer), loads each selected key once for the query heads that share the selection, and splits the
slots of a few rows (a decode step) over many programs. The backwards recompute the probabilities from the saved
log-sum-exp and scatter key/value gradients with atomic adds (a key is shared by many queries).

Only `sea_dispatch` imports this module, and chooses which of these entry points serves a call.
"""

import torch

try:  # the one guarded import: the Hub loader's import check skips try blocks, so a bundle without Triton loads
    import triton
    import triton.language as tl
except ImportError as error:  # `sea_dispatch` catches this and runs the PyTorch path
    raise ImportError("SEA's Triton kernels need Triton (pip install triton)") from error

EMPTY_ROW = 1e30  # log-sum-exp stored for a row with no valid key: every probability underflows to 0
_EMPTY = tl.constexpr(EMPTY_ROW)
TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def key_value_head(head, num_heads, group):
    """Flattened (batch, key/value head) read by flattened (batch, query head) `head`: query heads come in
    groups of `group` per key/value head (grouped-query attention; 1 for multi-head attention)."""
    return (head // num_heads) * (num_heads // group) + (head % num_heads) // group


@triton.jit
def _sparse_forward(
    Q, K, V, INDEX, VALID, OUT, PROBS, LSE,
    num_queries, kv_head_stride, slots, scaling, num_heads, group,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    scaling = tl.cast(scaling, tl.float32)  # inductor passes Python floats as float64
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    # Offsets in int64: a (batch x head x row x dim) tensor may pass 2^31 elements.
    head = tl.program_id(1).to(tl.int64)  # flattened (batch, head)
    row_ok = rows < num_queries
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    tile_ok = row_ok[:, None] & dim_ok[None, :]
    q_rows = head * num_queries + rows  # row offsets into the (N*H*T, D) views of Q, OUT
    kv_base = key_value_head(head, num_heads, group) * kv_head_stride
    slot_base = q_rows * slots
    q = tl.load(Q + q_rows[:, None] * HEAD_DIM + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)

    # Pass 1: running max and normaliser of the scores over the valid slots.
    running_max = tl.full([BLOCK_M], -_EMPTY, tl.float32)
    normaliser = tl.zeros([BLOCK_M], tl.float32)
    for s in range(0, slots):
        ok = (tl.load(VALID + slot_base + s, mask=row_ok, other=0) != 0) & row_ok
        key = tl.load(INDEX + slot_base + s, mask=ok, other=0)
        k = tl.load(K + kv_base + key[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None] & dim_ok[None, :],
                    other=0.0).to(tl.float32)
        score = tl.where(ok, tl.sum(q * k, axis=1) * scaling, -_EMPTY)
        new_max = tl.maximum(running_max, score)
        normaliser = normaliser * tl.exp(running_max - new_max) + tl.where(ok, tl.exp(score - new_max), 0.0)
        running_max = new_max
    has_keys = normaliser > 0
    lse = tl.where(has_keys, running_max + tl.log(tl.where(has_keys, normaliser, 1.0)), _EMPTY)
    tl.store(LSE + q_rows, lse, mask=row_ok)

    # Pass 2: the probabilities, and the context they weight.
    context = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(0, slots):
        ok = (tl.load(VALID + slot_base + s, mask=row_ok, other=0) != 0) & row_ok
        key = tl.load(INDEX + slot_base + s, mask=ok, other=0)
        kv_offsets = kv_base + key[:, None] * HEAD_DIM + dims[None, :]
        k = tl.load(K + kv_offsets, mask=ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + kv_offsets, mask=ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        p = tl.where(ok, tl.exp(tl.sum(q * k, axis=1) * scaling - lse), 0.0)
        tl.store(PROBS + slot_base + s, p.to(PROBS.dtype.element_ty), mask=row_ok)
        context += p[:, None] * v
    tl.store(OUT + q_rows[:, None] * HEAD_DIM + dims[None, :], context.to(OUT.dtype.element_ty), mask=tile_ok)


@triton.jit
def _sparse_backward(
    Q, K, V, INDEX, VALID, LSE, GRAD_OUT, GRAD_PROBS, DELTA, GRAD_Q, GRAD_K, GRAD_V,
    num_queries, kv_head_stride, slots, scaling, num_heads, group,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GRAD_PROBS: tl.constexpr,
):
    scaling = tl.cast(scaling, tl.float32)  # inductor passes Python floats as float64
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1).to(tl.int64)
    row_ok = rows < num_queries
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    tile_ok = row_ok[:, None] & dim_ok[None, :]
    q_rows = head * num_queries + rows
    kv_base = key_value_head(head, num_heads, group) * kv_head_stride
    slot_base = q_rows * slots
    q = tl.load(Q + q_rows[:, None] * HEAD_DIM + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    grad_out = tl.load(GRAD_OUT + q_rows[:, None] * HEAD_DIM + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    lse = tl.load(LSE + q_rows, mask=row_ok, other=_EMPTY)
    delta = tl.load(DELTA + q_rows, mask=row_ok, other=0.0)
    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(0, slots):
        ok = (tl.load(VALID + slot_base + s, mask=row_ok, other=0) != 0) & row_ok
        key = tl.load(INDEX + slot_base + s, mask=ok, other=0)
        kv_offsets = kv_base + key[:, None] * HEAD_DIM + dims[None, :]
        kv_ok = ok[:, None] & dim_ok[None, :]
        k = tl.load(K + kv_offsets, mask=kv_ok, other=0.0).to(tl.float32)
        v = tl.load(V + kv_offsets, mask=kv_ok, other=0.0).to(tl.float32)
        p = tl.where(ok, tl.exp(tl.sum(q * k, axis=1) * scaling - lse), 0.0)
        grad_p = tl.sum(grad_out * v, axis=1)
        if HAS_GRAD_PROBS:
            grad_p += tl.load(GRAD_PROBS + slot_base + s, mask=ok, other=0.0).to(tl.float32)
        grad_score = p * (grad_p - delta) * scaling
        grad_q += grad_score[:, None] * k
        tl.atomic_add(GRAD_K + kv_offsets, grad_score[:, None] * q, mask=kv_ok)
        tl.atomic_add(GRAD_V + kv_offsets, p[:, None] * grad_out, mask=kv_ok)
    tl.store(GRAD_Q + q_rows[:, None] * HEAD_DIM + dims[None, :], grad_q, mask=tile_ok)


@triton.jit
def _key_tile(K, V, POSITIONS, start, offset, length, batch_keys, kv_base, dims, dim_ok,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, GATHER: tl.constexpr):
    """Ranks start + offset + [0, BLOCK_N) of a range of `length` ranks: the ranks, which are inside the range,
    their key positions, and the key and value rows there (zero outside the range), as DOT_DTYPE."""
    inside = offset + tl.arange(0, BLOCK_N) < length
    ranks = start + offset + tl.arange(0, BLOCK_N)
    if GATHER:  # padding among the keys: rank -> position through the table
        positions = tl.load(POSITIONS + batch_keys + ranks, mask=inside, other=0)
    else:
        positions = ranks
    offsets = kv_base + positions[:, None].to(tl.int64) * HEAD_DIM + dims[None, :]  # int32 ranks, int64 offsets
    tile_ok = inside[:, None] & dim_ok[None, :]
    k = tl.load(K + offsets, mask=tile_ok, other=0.0).to(DOT_DTYPE)
    v = tl.load(V + offsets, mask=tile_ok, other=0.0).to(DOT_DTYPE)
    return ranks, inside, offsets, tile_ok, k, v


@triton.jit
def _query_block(COUNTS, num_queries, kv_head_stride, num_ranges, num_heads, group, shared,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a block-kernel program (query block, flattened (batch, head)) needs to know of its rows: the batch,
    which rows exist, the head dims, the rows' offsets into (N*H*T, .) views, their visible-key counts, and the
    bases of their key/value head and of their key ranges (those of the selection head, which `shared`
    consecutive query heads read)."""
    block = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    batch = head // num_heads
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    dims = tl.arange(0, BLOCK_D)
    count = tl.load(COUNTS + batch * num_queries + rows, mask=row_ok, other=0)
    kv_base = key_value_head(head, num_heads, group) * kv_head_stride
    range_base = (key_value_head(head, num_heads, shared) * tl.cdiv(num_queries, BLOCK_M) + block) * num_ranges
    return batch, row_ok, dims, dims < HEAD_DIM, head * num_queries + rows, count, kv_base, range_base


@triton.jit
def _block_sparse_forward(
    Q, K, V, STARTS, LENGTHS, POSITIONS, COUNTS, OUT, LSE, PROBS, GATE_SCALE,
    num_queries, num_keys, kv_head_stride, num_ranges, slots, scaling, num_heads, group, shared,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NEED_PROBS: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, GATHER: tl.constexpr,
    GATED: tl.constexpr,
):
    """GATED: OUT holds the output gate's offset, and the program writes GATE_SCALE x attention + offset."""
    scaling = tl.cast(scaling, tl.float32)  # inductor passes Python floats as float64
    batch, row_ok, dims, dim_ok, q_rows, count, kv_base, range_base = _query_block(
        COUNTS, num_queries, kv_head_stride, num_ranges, num_heads, group, shared, HEAD_DIM, BLOCK_M, BLOCK_D)
    q = tl.load(Q + q_rows[:, None] * HEAD_DIM + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0).to(DOT_DTYPE)

    running_max = tl.full([BLOCK_M], -_EMPTY, tl.float32)
    normaliser = tl.zeros([BLOCK_M], tl.float32)
    context = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for r in range(0, num_ranges):
        start = tl.load(STARTS + range_base + r)
        length = tl.load(LENGTHS + range_base + r)
        for offset in range(0, length, BLOCK_N):
            ranks, inside, _, _, k, v = _key_tile(K, V, POSITIONS, start, offset, length, batch * num_keys, kv_base,
                                                  dims, dim_ok, HEAD_DIM, BLOCK_N, DOT_DTYPE, GATHER)
            ok = inside[None, :] & (ranks[None, :] < count[:, None])
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
            scores = tl.where(ok, scores, -_EMPTY)
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            p = tl.where(ok, tl.exp(scores - new_max[:, None]), 0.0)
            rescale = tl.exp(running_max - new_max)
            normaliser = normaliser * rescale + tl.sum(p, axis=1)
            context = context * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            running_max = new_max
    has_keys = normaliser > 0
    lse = tl.where(has_keys, running_max + tl.log(tl.where(has_keys, normaliser, 1.0)), _EMPTY)
    tl.store(LSE + q_rows, lse, mask=row_ok)
    context = context / tl.where(has_keys, normaliser, 1.0)[:, None]
    out_tile = q_rows[:, None] * HEAD_DIM + dims[None, :]
    out_ok = row_ok[:, None] & dim_ok[None, :]
    if GATED:
        gate_scale = tl.load(GATE_SCALE + q_rows, mask=row_ok, other=0.0)
        context = context * gate_scale[:, None] + tl.load(OUT + out_tile, mask=out_ok, other=0.0).to(tl.float32)
    tl.store(OUT + out_tile, context.to(OUT.dtype.element_ty), mask=out_ok)
    if NEED_PROBS:  # a second walk writes each slot's probability, now that the normaliser is known
        slot = 0
        for r in range(0, num_ranges):
            start = tl.load(STARTS + range_base + r)
            length = tl.load(LENGTHS + range_base + r)
            for offset in range(0, length, BLOCK_N):
                ranks, inside, _, _, k, v = _key_tile(K, V, POSITIONS, start, offset, length, batch * num_keys,
                                                      kv_base, dims, dim_ok, HEAD_DIM, BLOCK_N, DOT_DTYPE, GATHER)
                ok = inside[None, :] & (ranks[None, :] < count[:, None])
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
                p = tl.where(ok, tl.exp(scores - lse[:, None]), 0.0)
                columns = slot + offset + tl.arange(0, BLOCK_N)
                tl.store(PROBS + q_rows[:, None] * slots + columns[None, :], p.to(PROBS.dtype.element_ty),
                         mask=row_ok[:, None] & inside[None, :])
            slot += length


@triton.jit
def _block_sparse_backward(
    Q, K, V, STARTS, LENGTHS, POSITIONS, COUNTS, LSE, DELTA, GRAD_OUT, GRAD_PROBS, GRAD_Q, GRAD_K, GRAD_V,
    num_queries, num_keys, kv_head_stride, num_ranges, slots, scaling, num_heads, group, shared,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GRAD_PROBS: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, GATHER: tl.constexpr,
):
    scaling = tl.cast(scaling, tl.float32)  # inductor passes Python floats as float64
    batch, row_ok, dims, dim_ok, q_rows, count, kv_base, range_base = _query_block(
        COUNTS, num_queries, kv_head_stride, num_ranges, num_heads, group, shared, HEAD_DIM, BLOCK_M, BLOCK_D)
    row_tile = q_rows[:, None] * HEAD_DIM + dims[None, :]
    row_tile_ok = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + row_tile, mask=row_tile_ok, other=0.0).to(DOT_DTYPE)
    grad_out = tl.load(GRAD_OUT + row_tile, mask=row_tile_ok, other=0.0).to(DOT_DTYPE)
    lse = tl.load(LSE + q_rows, mask=row_ok, other=_EMPTY)
    delta = tl.load(DELTA + q_rows, mask=row_ok, other=0.0)
    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    slot = 0
    for r in range(0, num_ranges):
        start = tl.load(STARTS + range_base + r)
        length = tl.load(LENGTHS + range_base + r)
        for offset in range(0, length, BLOCK_N):
            ranks, inside, offsets, tile_ok, k, v = _key_tile(K, V, POSITIONS, start, offset, length,
                                                               batch * num_keys, kv_base, dims, dim_ok, HEAD_DIM,
                                                               BLOCK_N, DOT_DTYPE, GATHER)
            ok = inside[None, :] & (ranks[None, :] < count[:, None])
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
            p = tl.where(ok, tl.exp(scores - lse[:, None]), 0.0)
            grad_p = tl.dot(grad_out, tl.trans(v), input_precision=PRECISION)
            if HAS_GRAD_PROBS:
                columns = slot + offset + tl.arange(0, BLOCK_N)
                grad_p += tl.load(GRAD_PROBS + q_rows[:, None] * slots + columns[None, :],
                                  mask=row_ok[:, None] & inside[None, :], other=0.0).to(tl.float32)
            grad_score = (p * (grad_p - delta[:, None]) * scaling).to(q.dtype)
            grad_q += tl.dot(grad_score, k, input_precision=PRECISION)
            tl.atomic_add(GRAD_K + offsets, tl.dot(tl.trans(grad_score), q, input_precision=PRECISION), mask=tile_ok)
            tl.atomic_add(GRAD_V + offsets, tl.dot(tl.trans(p.to(q.dtype)), grad_out, input_precision=PRECISION),
                          mask=tile_ok)
        slot += length
    tl.store(GRAD_Q + row_tile, grad_q, mask=row_tile_ok)


@triton.jit
def _row_ranges(LENGTHS, selection_row, num_ranges, BLOCK_R: tl.constexpr):
    """A split-kernel row's ranges, concatenated: their lengths, ends (slot s lies in the range whose end is the
    first above s) and total."""
    range_ids = tl.arange(0, BLOCK_R)
    lengths = tl.load(LENGTHS + selection_row * num_ranges + range_ids, mask=range_ids < num_ranges, other=0)
    return lengths, tl.cumsum(lengths, axis=0), tl.sum(lengths, axis=0)


@triton.jit
def _slot_tile(STARTS, POSITIONS, selection_row, num_ranges, lengths, ends, total, count, slots, batch, num_keys,
               kv_base, dims, dim_ok, HEAD_DIM: tl.constexpr, GATHER: tl.constexpr):
    """Slots `slots` (BLOCK_N,) of a split-kernel row: which hold a visible key, and the offsets of its key/value
    rows in K and V, with their mask."""
    passed = ends[None, :] <= slots[:, None]  # (BLOCK_N, BLOCK_R): ranges wholly before each slot
    which = tl.sum(passed.to(tl.int32), axis=1)
    before = tl.sum(tl.where(passed, lengths[None, :], 0), axis=1)
    in_range = slots < total
    rank = tl.load(STARTS + selection_row * num_ranges + which, mask=in_range, other=0) + slots - before
    ok = in_range & (rank < count)
    if GATHER:
        position = tl.load(POSITIONS + batch * num_keys + rank, mask=ok, other=0)
    else:
        position = rank
    offsets = kv_base + position[:, None].to(tl.int64) * HEAD_DIM + dims[None, :]
    return ok, offsets, ok[:, None] & dim_ok[None, :]


@triton.jit
def _sparse_split_head(
    Q, K, V, STARTS, LENGTHS, POSITIONS, COUNTS, PARTIAL, OUT,
    num_queries, num_keys, kv_head_stride, num_ranges, split_slots, scaling, num_heads, group,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GATHER: tl.constexpr, WHOLE_ROW: tl.constexpr,
):
    """One query row with a selection of its own (flattened (batch, head, row)) over slots [split x split_slots,
    (split + 1) x split_slots) of its ranges, in float32 elementwise products: that share's running max,
    normaliser and unnormalised context, written to PARTIAL[row, split] = [max, normaliser, context (BLOCK_D)];
    with `WHOLE_ROW` (one share per row) the row's context itself, written to OUT (zero without keys), and nothing
    left to merge."""
    scaling = tl.cast(scaling, tl.float32)  # inductor passes Python floats as float64
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    head = row // num_queries
    batch = head // num_heads
    query = row % num_queries
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(Q + row * HEAD_DIM + dims, mask=dim_ok, other=0.0).to(tl.float32)
    count = tl.load(COUNTS + batch * num_queries + query)
    kv_base = key_value_head(head, num_heads, group) * kv_head_stride
    lengths, ends, total = _row_ranges(LENGTHS, row, num_ranges, BLOCK_R)

    running_max = tl.full([1], -_EMPTY, tl.float32)
    normaliser = tl.zeros([1], tl.float32)
    context = tl.zeros([BLOCK_D], tl.float32)
    for offset in range(0, split_slots, BLOCK_N):
        slots = split * split_slots + offset + tl.arange(0, BLOCK_N)
        ok, offsets, tile_ok = _slot_tile(STARTS, POSITIONS, row, num_ranges, lengths, ends, total, count, slots,
                                          batch, num_keys, kv_base, dims, dim_ok, HEAD_DIM, GATHER)
        k = tl.load(K + offsets, mask=tile_ok, other=0.0).to(tl.float32)
        scores = tl.where(ok, tl.sum(q[None, :] * k, axis=1) * scaling, -_EMPTY)
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        p = tl.where(ok, tl.exp(scores - new_max), 0.0)
        rescale = tl.exp(running_max - new_max)
        v = tl.load(V + offsets, mask=tile_ok, other=0.0).to(tl.float32)
        normaliser = normaliser * rescale + tl.sum(p, axis=0)
        context = context * rescale + tl.sum(p[:, None] * v, axis=0)
        running_max = new_max
    if WHOLE_ROW:
        row_normaliser = tl.sum(normaliser, axis=0)  # the (1,) running normaliser as a scalar
        result = context / tl.where(row_normaliser > 0, row_normaliser, 1.0)
        tl.store(OUT + row * HEAD_DIM + dims, result.to(OUT.dtype.element_ty), mask=dim_ok)
    else:
        record = PARTIAL + (row * tl.num_programs(1) + split) * (BLOCK_D + 2)
        tl.store(record + tl.arange(0, 1), running_max)
        tl.store(record + 1 + tl.arange(0, 1), normaliser)
        tl.store(record + 2 + dims, context)


@triton.jit
def _sparse_split_group(
    Q, K, V, STARTS, LENGTHS, POSITIONS, COUNTS, PARTIAL, OUT,
    num_queries, num_keys, kv_head_stride, num_ranges, split_slots, scaling, num_heads, group, shared,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, GATHER: tl.constexpr, WHOLE_ROW: tl.constexpr, PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """`_sparse_split_head` for the `shared` query heads that share a selection (flattened (batch, selection head,
    row)): each selected key and value is loaded once for all of them, the rows of the tile's matrix products
    (BLOCK_H >= 16: tensor cores). Writes each head's share or, with `WHOLE_ROW`, its context, as that kernel."""
    scaling = tl.cast(scaling, tl.float32)  # inductor passes Python floats as float64
    selection_row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    query = selection_row % num_queries
    selection_head = selection_row // num_queries  # flattened (batch, selection head)
    batch = selection_head // (num_heads // shared)
    first_head = batch * num_heads + (selection_head % (num_heads // shared)) * shared  # flattened (batch, head)
    head_ok = tl.arange(0, BLOCK_H) < shared
    q_rows = (first_head + tl.arange(0, BLOCK_H)) * num_queries + query  # rows of the (N*H*T, .) views
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(Q + q_rows[:, None] * HEAD_DIM + dims[None, :], mask=head_ok[:, None] & dim_ok[None, :],
                other=0.0).to(DOT_DTYPE)
    count = tl.load(COUNTS + batch * num_queries + query)
    kv_base = key_value_head(first_head, num_heads, group) * kv_head_stride
    lengths, ends, total = _row_ranges(LENGTHS, selection_row, num_ranges, BLOCK_R)

    running_max = tl.full([BLOCK_H], -_EMPTY, tl.float32)
    normaliser = tl.zeros([BLOCK_H], tl.float32)
    context = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for offset in range(0, split_slots, BLOCK_N):
        slots = split * split_slots + offset + tl.arange(0, BLOCK_N)
        ok, offsets, tile_ok = _slot_tile(STARTS, POSITIONS, selection_row, num_ranges, lengths, ends, total, count,
                                          slots, batch, num_keys, kv_base, dims, dim_ok, HEAD_DIM, GATHER)
        k = tl.load(K + offsets, mask=tile_ok, other=0.0).to(DOT_DTYPE)
        scores = tl.where(ok[None, :], tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling, -_EMPTY)
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        p = tl.where(ok[None, :], tl.exp(scores - new_max[:, None]), 0.0)
        rescale = tl.exp(running_max - new_max)
        v = tl.load(V + offsets, mask=tile_ok, other=0.0).to(DOT_DTYPE)
        normaliser = normaliser * rescale + tl.sum(p, axis=1)
        context = context * rescale[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        running_max = new_max
    if WHOLE_ROW:
        result = context / tl.where(normaliser > 0, normaliser, 1.0)[:, None]
        tl.store(OUT + q_rows[:, None] * HEAD_DIM + dims[None, :], result.to(OUT.dtype.element_ty),
                 mask=head_ok[:, None] & dim_ok[None, :])
    else:
        records = PARTIAL + (q_rows * tl.num_programs(1) + split) * (BLOCK_D + 2)
        tl.store(records, running_max, mask=head_ok)
        tl.store(records + 1, normaliser, mask=head_ok)
        tl.store(records[:, None] + 2 + dims[None, :], context, mask=head_ok[:, None])


@triton.jit
def _sparse_decode_combine(PARTIAL, OUT, num_splits, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_S: tl.constexpr):
    """One query row: the splits' shares merged into its softmax-weighted context (zero without keys)."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    records = PARTIAL + (row * num_splits + splits) * (BLOCK_D + 2)
    maxima = tl.load(records, mask=split_ok, other=-_EMPTY)
    normalisers = tl.load(records + 1, mask=split_ok, other=0.0)
    contexts = tl.load(records[:, None] + 2 + dims[None, :], mask=split_ok[:, None], other=0.0)
    weights = tl.exp(maxima - tl.max(maxima, axis=0))
    normaliser = tl.sum(normalisers * weights, axis=0)
    context = tl.sum(contexts * weights[:, None], axis=0) / tl.where(normaliser > 0, normaliser, 1.0)
    tl.store(OUT + row * HEAD_DIM + dims, context.to(OUT.dtype.element_ty), mask=dims < HEAD_DIM)


# Key tile and launch shape of the block kernels, measured once per problem kind on the GPU (key/value
# gradients are accumulated atomically, so the backward's trial runs start from zeroed buffers).
BLOCK_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                 for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
_block_forward_tuned = triton.autotune(BLOCK_CONFIGS, key=["HEAD_DIM", "BLOCK_M", "NEED_PROBS", "GATHER", "GATED"],
                                       restore_value=["OUT"])(
    _block_sparse_forward)
_block_backward_tuned = triton.autotune(BLOCK_CONFIGS, key=["HEAD_DIM", "BLOCK_M", "HAS_GRAD_PROBS", "GATHER"],
                                        reset_to_zero=["GRAD_K", "GRAD_V"])(_block_sparse_backward)


BLOCK_M = 32  # query rows per program of the per-query kernel
INTERPRETER_BLOCK_N = 64  # keys per tile of the block kernels in Triton's interpreter, which cannot time configs


def kernel_for_device(kernel, tuned, on_gpu: bool, arguments: dict, **interpreter_arguments):
    """The autotuned kernel and `arguments` on a GPU; under the interpreter, which cannot time configs, the plain
    kernel with `interpreter_arguments` fixing what the autotuner would choose."""
    if on_gpu:
        return tuned, arguments
    return kernel, {**arguments, **interpreter_arguments}


def dot_arguments(x: torch.Tensor) -> dict:
    """DOT_DTYPE and PRECISION of a kernel's matrix products for tensors like `x`: their own half precision, or
    exact float32. Triton's interpreter (CPU tests) multiplies bfloat16 matrices wrongly: there they go through
    float32."""
    interpreted_bf16 = x.dtype == torch.bfloat16 and not x.is_cuda
    dot_dtype = tl.float32 if x.dtype == torch.float32 or interpreted_bf16 else TRITON_DTYPES[x.dtype]
    return dict(DOT_DTYPE=dot_dtype, PRECISION="ieee" if dot_dtype == tl.float32 else "tf32")


def _grid(q):
    n, h, t, _ = q.shape
    return (triton.cdiv(t, BLOCK_M), n * h)


def _read_in_place(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v laid out as the kernels read them: rows of D contiguous elements, every (batch, key/value head) a
    fixed stride (`stride(1)`) after the previous one. A cache's view of its larger buffer (`SeaKeyValueLayer`) is
    laid out so and is read in place: copying it would copy the whole cache at every decode step."""
    def readable(x):
        return x.stride(3) == 1 and x.stride(2) == x.shape[3] and x.stride(0) == x.shape[1] * x.stride(1)

    if readable(k) and readable(v) and k.stride() == v.stride():
        return k, v
    return k.contiguous(), v.contiguous()


def _backward_prologue(out, probs, grad_probs, grad_out):
    """delta = sum_s P_s dL/dP_s per row (dL/dP_s = grad_out . v_s + grad_probs_s), and float32 gradient buffers
    (key/value gradients are accumulated with atomic adds)."""
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_probs is not None:
        grad_probs = grad_probs.contiguous()
        delta = delta + (grad_probs.float() * probs.float()).sum(-1)
    return grad_out, grad_probs, delta.contiguous()


class _SparseAttention(torch.autograd.Function):
    """One query per row of a program: every query walks its own slots (sea_query_block_size 1)."""

    @staticmethod
    def forward(ctx, q, k, v, key_index, key_valid, scaling):
        q, (k, v) = q.contiguous(), _read_in_place(k, v)
        key_index, key_valid = key_index.contiguous(), key_valid.contiguous()
        n, h, t, d = q.shape
        slots = key_index.shape[-1]
        out = torch.empty_like(q)
        probs = torch.empty(n, h, t, slots, dtype=v.dtype, device=q.device)
        lse = torch.empty(n, h, t, dtype=torch.float32, device=q.device)
        if slots > 0 and t > 0:
            _sparse_forward[_grid(q)](
                q, k, v, key_index, key_valid, out, probs, lse, t, k.stride(1), slots, scaling, h, h // k.shape[1],
                HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_D=triton.next_power_of_2(d),
            )
        else:
            out.zero_()
            lse.fill_(EMPTY_ROW)
        ctx.save_for_backward(q, k, v, key_index, key_valid, out, probs, lse)
        ctx.scaling = scaling
        return probs, out

    @staticmethod
    def backward(ctx, grad_probs, grad_out):
        q, k, v, key_index, key_valid, out, probs, lse = ctx.saved_tensors
        k, v = k.contiguous(), v.contiguous()  # laid out as their gradients
        n, h, t, d = q.shape
        grad_out, grad_probs, delta = _backward_prologue(out, probs, grad_probs, grad_out)
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        if key_index.shape[-1] > 0 and t > 0:
            _sparse_backward[_grid(q)](
                q, k, v, key_index, key_valid, lse, grad_out, grad_probs if grad_probs is not None else grad_out,
                delta, grad_q, grad_k, grad_v, t, k.stride(1), key_index.shape[-1], ctx.scaling, h,
                h // k.shape[1],
                HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_D=triton.next_power_of_2(d), HAS_GRAD_PROBS=grad_probs is not None,
            )
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def _block_forward(q, k, v, starts, lengths, positions, counts, rows_per_block, shared, slots, scaling, need_probs,
                   out, gate_scale=None):
    """Launches `_block_sparse_forward`, writing `out` (with `gate_scale`: reading the gate's offset from `out`).
    Returns the kernel's arguments (for the backward), the int32 ranges and positions, the log-sum-exp and the
    probabilities (empty when not `need_probs`)."""
    gather = positions is not None
    # int32 ranks keep the kernel's loop counters in one type (and halve the index traffic).
    starts, lengths, counts = (x.to(torch.int32).contiguous() for x in (starts, lengths, counts))
    positions = positions.to(torch.int32).contiguous() if gather else counts
    n, h, t, d = q.shape
    lse = torch.empty(n, h, t, dtype=torch.float32, device=q.device)
    probs = torch.zeros(n, h, t, slots if need_probs else 0, dtype=v.dtype, device=q.device)
    arguments = dict(HEAD_DIM=d, BLOCK_M=rows_per_block, BLOCK_D=max(16, triton.next_power_of_2(d)),
                     GATHER=gather, **dot_arguments(q))
    if t > 0:
        kernel, launch = kernel_for_device(_block_sparse_forward, _block_forward_tuned, q.is_cuda, arguments,
                                            BLOCK_N=INTERPRETER_BLOCK_N)
        kernel[(triton.cdiv(t, rows_per_block), n * h)](
            q, k, v, starts, lengths, positions, counts, out, lse, probs, gate_scale if gate_scale is not None else lse,
            t, k.shape[2], k.stride(1), starts.shape[-1], slots, scaling, h, h // k.shape[1], shared,
            NEED_PROBS=need_probs,
            GATED=gate_scale is not None, **launch,
        )
    return arguments, (starts, lengths, positions, counts), lse, probs


class _BlockSparseAttention(torch.autograd.Function):
    """A block of queries sharing its key ranges per program: tiles of keys go through matrix products
    (sea_query_block_size > 1)."""

    @staticmethod
    def forward(ctx, q, k, v, starts, lengths, positions, counts, rows_per_block, shared, slots, scaling,
                need_probs):
        q, (k, v) = q.contiguous(), _read_in_place(k, v)
        out = torch.empty_like(q)
        arguments, ranges, lse, probs = _block_forward(q, k, v, starts, lengths, positions, counts, rows_per_block,
                                                       shared, slots, scaling, need_probs, out)
        ctx.save_for_backward(q, k, v, *ranges, out, probs, lse)
        ctx.setup = (shared, slots, scaling, arguments)
        return (probs if need_probs else None), out

    @staticmethod
    def backward(ctx, grad_probs, grad_out):
        q, k, v, starts, lengths, positions, counts, out, probs, lse = ctx.saved_tensors
        k, v = k.contiguous(), v.contiguous()  # laid out as their gradients
        shared, slots, scaling, arguments = ctx.setup
        n, h, t, d = q.shape
        grad_out, grad_probs, delta = _backward_prologue(out, probs, grad_probs, grad_out)
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        if t > 0:
            kernel, launch = kernel_for_device(_block_sparse_backward, _block_backward_tuned, q.is_cuda, arguments,
                                                BLOCK_N=INTERPRETER_BLOCK_N)
            kernel[(triton.cdiv(t, arguments["BLOCK_M"]), n * h)](
                q, k, v, starts, lengths, positions, counts, lse, delta, grad_out,
                grad_probs if grad_probs is not None else grad_out, grad_q, grad_k, grad_v,
                t, k.shape[2], k.stride(1), starts.shape[-1], slots, scaling, h, h // k.shape[1], shared,
                HAS_GRAD_PROBS=grad_probs is not None, **launch,
            )
        return (grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)) + (None,) * 9


DECODE_SPLIT_SLOTS = 128  # slots per program of the split kernel while rows are few: 8 programs per 1024-key row
DECODE_TILE_SLOTS = 64  # slots a split-kernel program reads at once (DECODE_SPLIT_SLOTS is a multiple)
SPLIT_KERNEL_PROGRAMS = 8192  # rows are split until about this many programs run (many rows: one program each)


def split_shares(rows: int, slots: int) -> tuple[int, int]:
    """(shares per row, slots per share) of the split kernel: rows split into shares of `DECODE_SPLIT_SLOTS` while
    that keeps the programs within `SPLIT_KERNEL_PROGRAMS` (a decode step's few rows), into fewer and longer ones
    as rows grow, and not at all once the rows alone fill the GPU (a prefill)."""
    splits = max(1, min(triton.cdiv(slots, DECODE_SPLIT_SLOTS), SPLIT_KERNEL_PROGRAMS // max(rows, 1)))
    share = triton.cdiv(triton.cdiv(max(slots, 1), splits), DECODE_TILE_SLOTS) * DECODE_TILE_SLOTS
    return triton.cdiv(max(slots, 1), share), share


def per_query_inference_attention(q, k, v, selection, scaling: float) -> torch.Tensor:
    """Context of per-query selections, for inference (no probabilities, no backward). The per-slot kernel needs
    every row's key index and a probability buffer (N, H, T, S) and walks the slots one by one; here each row's
    ranges are read directly and its slots walked in tiles, for all the query heads that share the selection at
    once (`heads_per_selection`: a key/value group's heads read each key once), cut into shares that programs walk
    side by side when rows are few (a decode step: one row per head), then a second kernel merges the shares'
    online softmax; with one share per row (a prefill) each program writes its rows' context itself."""
    q, (k, v) = q.contiguous(), _read_in_place(k, v)
    n, h, t, d = q.shape
    starts, lengths, counts = (x.to(torch.int32).contiguous() for x in (selection.starts, selection.lengths,
                                                                        selection.row_counts))
    gather = selection.key_positions is not None
    positions = selection.key_positions.to(torch.int32).contiguous() if gather else counts
    shared = selection.heads_per_selection
    selection_rows = n * (h // shared) * t
    splits, share = split_shares(selection_rows, selection.slots)
    block_d = max(16, triton.next_power_of_2(d))
    whole_row = splits == 1
    out = torch.empty_like(q)
    # With one share per row the kernel writes `out` itself and never reads its PARTIAL argument.
    partial = out if whole_row else torch.empty(n * h * t, splits, block_d + 2, dtype=torch.float32, device=q.device)
    num_ranges = starts.shape[-1]
    if t > 0 and num_ranges > 0:
        common = (q, k, v, starts, lengths, positions, counts, partial, out, t, k.shape[2], k.stride(1), num_ranges,
                  share, scaling, h, h // k.shape[1])
        shapes = dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=DECODE_TILE_SLOTS,
                      BLOCK_R=max(16, triton.next_power_of_2(num_ranges)), GATHER=gather, WHOLE_ROW=whole_row)
        if shared == 1:
            _sparse_split_head[(selection_rows, splits)](*common, **shapes)
        else:  # 2 warps: 5.1 ms vs 30.2 with the default 4 (one 1B-shape layer at 8k, H200, kernel_notes.md)
            _sparse_split_group[(selection_rows, splits)](
                *common, shared, BLOCK_H=max(16, triton.next_power_of_2(shared)), **shapes, **dot_arguments(q),
                num_warps=2)
        if not whole_row:
            _sparse_decode_combine[(n * h * t,)](partial, out, splits, HEAD_DIM=d, BLOCK_D=block_d,
                                                 BLOCK_S=max(2, triton.next_power_of_2(splits)))
    else:
        out.zero_()
    return out


def gated_block_attention(q, k, v, selection, scaling: float, scale: torch.Tensor, offset: torch.Tensor):
    """For inference with query blocks and no probabilities: scale x `block_sparse_attention`'s context + offset
    (the output gate), written by the kernel into `offset`'s memory, which the caller gives up: no other buffer of
    the output's size is allocated. scale (N, H, T, 1) float32, offset (N, H, T, D) contiguous, in q's dtype."""
    _block_forward(q.contiguous(), *_read_in_place(k, v), selection.starts, selection.lengths,
                   selection.key_positions, selection.row_counts, selection.rows_per_block,
                   selection.heads_per_selection, 0, scaling, False, offset, scale)
    return offset


def per_query_sparse_attention(q, k, v, selection, scaling: float, need_probs: bool):
    """`sea_attention.sparse_attention` of per-query selections (`rows_per_block` 1), differentiable: every query
    walks its own slots. Returns (probabilities (N, H, T, S) or None when not `need_probs`, context (N, H, T, D))."""
    probs, context = _SparseAttention.apply(q, k, v, *selection.per_row, scaling)
    return (probs if need_probs else None), context


def block_sparse_attention(q, k, v, selection, scaling: float, need_probs: bool):
    """`sea_attention.sparse_attention` of blocks of queries sharing their keys, differentiable, through matrix
    products; returns as `per_query_sparse_attention`."""
    return _BlockSparseAttention.apply(
        q, k, v, selection.starts, selection.lengths, selection.key_positions, selection.row_counts,
        selection.rows_per_block, selection.heads_per_selection, selection.slots if need_probs else 0, scaling,
        need_probs,
    )
