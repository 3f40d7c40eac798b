"""Triton kernels: drop-in accelerations of functions in `sea_attention.py`, tested against them.

`sparse_attention_triton` computes exactly what `sea_attention.sparse_attention` computes (softmax of each query
over its selected keys; probabilities and context), forward and backward, without gathering the selected keys and
values into memory: each program takes a block of query rows of one head, walks their slots, loads the selected
key/value rows straight from K and V, and keeps an online softmax in float32. The backward recomputes the
probabilities from the saved log-sum-exp and scatters key/value gradients with atomic adds (a key is shared by
many queries).

`causal_kernel_encoding_triton` computes the causal half of `SeaAttention.kernel_encoding` for inference: kernel
features, causal kernel attention from carried sums, the encoder, and the output gate (`SeaAttention.output_gate`,
with the running mean of the values), fused so that neither the features, the estimate nor the encoding of rows
the CNN does not read reach memory (the decoder, CNN and selection stay in PyTorch: at inference they run on a few
rows per query block only). `gated_block_attention_triton` then applies the gate as the sparse kernel writes.

Triton is optional: on the CPU the PyTorch path runs (the kernels run there only under TRITON_INTERPRET=1, as the
tests do).
"""

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # the PyTorch path serves; `kernel_unavailable_reason` says why no kernel runs
    triton = None

    class OutOfResources(Exception):
        """Stands in for Triton's error (never raised without Triton), so callers can name it."""

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension
EMPTY_ROW = 1e30  # log-sum-exp stored for a row with no valid key: every probability underflows to 0


def kernel_unavailable_reason(q: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot serve these queries, or None when it can."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "the tensors are not on a CUDA device (Triton runs on the CPU only under TRITON_INTERPRET=1)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not one of {SUPPORTED_DTYPES}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} exceeds {MAX_HEAD_DIM}"
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:  # the sparse kernels launch (query blocks, batch x heads) grids
        return f"batch x heads = {q.shape[0] * q.shape[1]} exceeds {MAX_GRID_Y} (split the batch)"
    return None


if triton is not None:
    _EMPTY = tl.constexpr(EMPTY_ROW)
    TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

    @triton.jit
    def _key_value_head(head, num_heads, group):
        """Flattened (batch, key/value head) read by flattened (batch, query head) `head`: query heads come in
        groups of `group` per key/value head (grouped-query attention; 1 for multi-head attention)."""
        return (head // num_heads) * (num_heads // group) + (head % num_heads) // group

    @triton.jit
    def _sparse_forward(
        Q, K, V, INDEX, VALID, OUT, PROBS, LSE,
        num_queries, kv_head_stride, slots, scaling, num_heads, group,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        # Offsets in int64: a (batch x head x row x dim) tensor may pass 2^31 elements.
        head = tl.program_id(1).to(tl.int64)  # flattened (batch, head)
        row_ok = rows < num_queries
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        tile_ok = row_ok[:, None] & dim_ok[None, :]
        q_rows = head * num_queries + rows  # row offsets into the (N*H*T, D) views of Q, OUT
        kv_base = _key_value_head(head, num_heads, group) * kv_head_stride
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
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        head = tl.program_id(1).to(tl.int64)
        row_ok = rows < num_queries
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        tile_ok = row_ok[:, None] & dim_ok[None, :]
        q_rows = head * num_queries + rows
        kv_base = _key_value_head(head, num_heads, group) * kv_head_stride
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
    def _query_block(COUNTS, num_queries, kv_head_stride, num_ranges, num_heads, group,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """What a block-kernel program (query block, flattened (batch, head)) needs to know of its rows: the batch,
        which rows exist, the head dims, the rows' offsets into (N*H*T, .) views, their visible-key counts, and the
        bases of their key/value head and of their key ranges."""
        block = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)
        batch = head // num_heads
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_queries
        dims = tl.arange(0, BLOCK_D)
        count = tl.load(COUNTS + batch * num_queries + rows, mask=row_ok, other=0)
        kv_base = _key_value_head(head, num_heads, group) * kv_head_stride
        range_base = (head * tl.cdiv(num_queries, BLOCK_M) + block) * num_ranges
        return batch, row_ok, dims, dims < HEAD_DIM, head * num_queries + rows, count, kv_base, range_base

    @triton.jit
    def _block_sparse_forward(
        Q, K, V, STARTS, LENGTHS, POSITIONS, COUNTS, OUT, LSE, PROBS, GATE_SCALE,
        num_queries, num_keys, kv_head_stride, num_ranges, slots, scaling, num_heads, group,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        NEED_PROBS: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, GATHER: tl.constexpr,
        GATED: tl.constexpr,
    ):
        """GATED: OUT holds the output gate's offset, and the program writes GATE_SCALE x attention + offset."""
        batch, row_ok, dims, dim_ok, q_rows, count, kv_base, range_base = _query_block(
            COUNTS, num_queries, kv_head_stride, num_ranges, num_heads, group, HEAD_DIM, BLOCK_M, BLOCK_D)
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
        num_queries, num_keys, kv_head_stride, num_ranges, slots, scaling, num_heads, group,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_GRAD_PROBS: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, GATHER: tl.constexpr,
    ):
        batch, row_ok, dims, dim_ok, q_rows, count, kv_base, range_base = _query_block(
            COUNTS, num_queries, kv_head_stride, num_ranges, num_heads, group, HEAD_DIM, BLOCK_M, BLOCK_D)
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
    def _sparse_decode_split(
        Q, K, V, STARTS, LENGTHS, POSITIONS, COUNTS, PARTIAL,
        num_queries, num_keys, kv_head_stride, num_ranges, split_slots, scaling, num_heads, group,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        GATHER: tl.constexpr,
    ):
        """One query row (flattened (batch, head, row)) over slots [split x split_slots, (split + 1) x
        split_slots) of its ranges: that share's running max, normaliser and unnormalised context, written to
        PARTIAL[row, split] = [max, normaliser, context (BLOCK_D)]."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        head = row // num_queries
        batch = head // num_heads
        query = row % num_queries
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q = tl.load(Q + row * HEAD_DIM + dims, mask=dim_ok, other=0.0).to(tl.float32)
        count = tl.load(COUNTS + batch * num_queries + query)
        kv_base = _key_value_head(head, num_heads, group) * kv_head_stride
        # The row's ranges, concatenated: slot s lies in the range whose end is the first above s.
        range_ids = tl.arange(0, BLOCK_R)
        lengths = tl.load(LENGTHS + row * num_ranges + range_ids, mask=range_ids < num_ranges, other=0)
        ends = tl.cumsum(lengths, axis=0)
        total = tl.sum(lengths, axis=0)

        running_max = tl.full([1], -_EMPTY, tl.float32)
        normaliser = tl.zeros([1], tl.float32)
        context = tl.zeros([BLOCK_D], tl.float32)
        first = split * split_slots
        for offset in range(0, split_slots, BLOCK_N):
            slots = first + offset + tl.arange(0, BLOCK_N)
            passed = ends[None, :] <= slots[:, None]  # (BLOCK_N, BLOCK_R): ranges wholly before each slot
            which = tl.sum(passed.to(tl.int32), axis=1)
            before = tl.sum(tl.where(passed, lengths[None, :], 0), axis=1)
            in_range = slots < total
            rank = tl.load(STARTS + row * num_ranges + which, mask=in_range, other=0) + slots - before
            ok = in_range & (rank < count)
            if GATHER:
                position = tl.load(POSITIONS + batch * num_keys + rank, mask=ok, other=0)
            else:
                position = rank
            offsets = kv_base + position[:, None].to(tl.int64) * HEAD_DIM + dims[None, :]
            tile_ok = ok[:, None] & dim_ok[None, :]
            k = tl.load(K + offsets, mask=tile_ok, other=0.0).to(tl.float32)
            scores = tl.where(ok, tl.sum(q[None, :] * k, axis=1) * scaling, -_EMPTY)
            new_max = tl.maximum(running_max, tl.max(scores, axis=0))
            p = tl.where(ok, tl.exp(scores - new_max), 0.0)
            rescale = tl.exp(running_max - new_max)
            v = tl.load(V + offsets, mask=tile_ok, other=0.0).to(tl.float32)
            normaliser = normaliser * rescale + tl.sum(p, axis=0)
            context = context * rescale + tl.sum(p[:, None] * v, axis=0)
            running_max = new_max
        record = PARTIAL + (row * tl.num_programs(1) + split) * (BLOCK_D + 2)
        tl.store(record + tl.arange(0, 1), running_max)
        tl.store(record + 1 + tl.arange(0, 1), normaliser)
        tl.store(record + 2 + dims, context)

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


    @triton.jit
    def _matrix_rows(X, base, rows, row_ok, HEAD_DIM: tl.constexpr):
        """Rows base + `rows` of a row-major (., HEAD_DIM) matrix X, zero where not `row_ok`."""
        dims = tl.arange(0, HEAD_DIM)
        return tl.load(X + (base + rows)[:, None] * HEAD_DIM + dims[None, :], mask=row_ok[:, None], other=0.0)

    @triton.jit
    def _kernel_features(X, PROJECTION, base, rows, keep, num_features, scale, eps,
                         HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr, SUMS_PRECISION: tl.constexpr):
        """`kernel_features` of rows base + `rows` of X: relu(x D^-1/4 P^T) + eps, (rows, BLOCK_F) float32, zero
        in the padding features and in the rows not kept."""
        dims = tl.arange(0, HEAD_DIM)
        features = tl.arange(0, BLOCK_F)
        used = features < num_features
        projection_t = tl.load(PROJECTION + features[None, :] * HEAD_DIM + dims[:, None], mask=used[None, :],
                               other=0.0).to(tl.float32)
        x = _matrix_rows(X, base, rows, keep, HEAD_DIM).to(tl.float32)
        projected = tl.dot(x * scale, projection_t, input_precision=SUMS_PRECISION)
        return tl.where(used[None, :] & keep[:, None], tl.maximum(projected, 0.0) + eps, 0.0)

    @triton.jit
    def _chunk_rows(VALID, batch, chunk, last, num_rows, CHUNK: tl.constexpr):
        """The rows of a chunk, which of them exist (below `last`), and which hold a valid key."""
        rows = chunk + tl.arange(0, CHUNK)
        row_ok = rows < last
        valid = (tl.load(VALID + batch * num_rows + rows, mask=row_ok, other=0) != 0) & row_ok
        return rows, row_ok, valid

    @triton.jit
    def _packed_sums(SUMS, index, column, HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr, TILE: tl.constexpr):
        """Pointers into record `index` of packed sums (see `_pack_sums`): columns column .. column + TILE - 1 of
        the (BLOCK_F, 2D) rows of phi(k) [code || v]^T, phi(k) (BLOCK_F), and where the sums of the valid values
        (D) begin."""
        base = index * (2 * BLOCK_F * HEAD_DIM + BLOCK_F + HEAD_DIM)
        features = tl.arange(0, BLOCK_F)
        kv = base + features[:, None] * (2 * HEAD_DIM) + column + tl.arange(0, TILE)[None, :]
        k = base + 2 * BLOCK_F * HEAD_DIM + features
        return SUMS + kv, SUMS + k, SUMS + base + 2 * BLOCK_F * HEAD_DIM + BLOCK_F

    @triton.jit
    def _augmented_columns(CODE, V, batch, kv_head, rows, row_ok, column, num_rows, HEAD_DIM: tl.constexpr,
                           TILE: tl.constexpr):
        """Columns column .. column + TILE - 1 of rows of [code || v] (code (N, T, D) is shared by the heads), float32."""
        columns = tl.arange(0, TILE)
        if column < HEAD_DIM:
            x = tl.load(CODE + (batch * num_rows + rows)[:, None] * HEAD_DIM + column + columns[None, :],
                        mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(V + (kv_head * num_rows + rows)[:, None] * HEAD_DIM + column - HEAD_DIM + columns[None, :],
                        mask=row_ok[:, None], other=0.0)
        return x.to(tl.float32)

    @triton.jit
    def _causal_kernel_sums(
        K, V, CODE, VALID, PROJECTION, SUMS,
        num_rows, first_row, last_row, segment_rows, num_segments, num_features, num_kv_heads, scale, eps,
        HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr, TILE: tl.constexpr, CHUNK: tl.constexpr,
        SUMS_PRECISION: tl.constexpr,
    ):
        """Per (batch x key/value head, segment of rows first_row .. last_row - 1, TILE columns of [code || v]):
        the segment's sums of phi(k_j) [code_j || v_j]^T in those columns, written into the segment's packed
        record; the first columns' program also sums phi(k_j), and the value columns' programs the valid v_j."""
        head = tl.program_id(0).to(tl.int64)
        segment = tl.program_id(1)
        column = tl.program_id(2) * TILE
        batch = head // num_kv_heads
        first = first_row + segment * segment_rows
        last = tl.minimum(first + segment_rows, last_row)
        sum_x = tl.zeros([BLOCK_F, TILE], tl.float32)
        sum_k = tl.zeros([BLOCK_F], tl.float32)
        sum_v = tl.zeros([TILE], tl.float32)
        for chunk in range(first, last, CHUNK):
            rows, row_ok, valid = _chunk_rows(VALID, batch, chunk, last, num_rows, CHUNK)
            phi_k = _kernel_features(K, PROJECTION, head * num_rows, rows, valid, num_features, scale, eps, HEAD_DIM,
                                     BLOCK_F, SUMS_PRECISION)
            x = _augmented_columns(CODE, V, batch, head, rows, row_ok, column, num_rows, HEAD_DIM, TILE)
            sum_x += tl.dot(tl.trans(phi_k), x, input_precision=SUMS_PRECISION)
            sum_k += tl.sum(phi_k, axis=0)
            sum_v += tl.sum(tl.where(valid[:, None], x, 0.0), axis=0)
        to_x, to_k, to_values = _packed_sums(SUMS, head * num_segments + segment, column, HEAD_DIM, BLOCK_F, TILE)
        tl.store(to_x, sum_x)
        if column == 0:
            tl.store(to_k, sum_k)
        if column >= HEAD_DIM:
            tl.store(to_values + column - HEAD_DIM + tl.arange(0, TILE), sum_v)

    @triton.jit
    def _chunk_kernel_products(Q, K, PROJECTION, head, kv_head, rows, row_ok, valid, sum_k, num_rows, num_features,
                               scale, eps, HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr, CHUNK: tl.constexpr,
                               SUMS_PRECISION: tl.constexpr):
        """A chunk's query and key features, the causal products phi(q_i).phi(k_j) inside the chunk (j <= i), and
        each query's denominator: its products with every key up to it (`sum_k` sums the keys before the chunk)."""
        phi_k = _kernel_features(K, PROJECTION, kv_head * num_rows, rows, valid, num_features, scale, eps, HEAD_DIM,
                                 BLOCK_F, SUMS_PRECISION)
        phi_q = _kernel_features(Q, PROJECTION, head * num_rows, rows, row_ok, num_features, scale, eps, HEAD_DIM,
                                 BLOCK_F, SUMS_PRECISION)
        local = tl.arange(0, CHUNK)
        within = tl.dot(phi_q, tl.trans(phi_k), input_precision=SUMS_PRECISION)
        within = tl.where(local[None, :] <= local[:, None], within, 0.0)
        denominator = tl.sum(phi_q * sum_k[None, :], axis=1) + tl.sum(within, axis=1)
        return phi_q, phi_k, within, tl.maximum(denominator, 1e-30)[:, None]

    @triton.jit
    def _causal_kernel_estimate(
        Q, K, V, CODE, VALID, PROJECTION, START, ESTIMATE,
        num_rows, first_row, last_row, segment_rows, num_segments, num_features, num_heads, group, scale, eps,
        HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr, TILE: tl.constexpr, CHUNK: tl.constexpr,
        SUMS_PRECISION: tl.constexpr,
    ):
        """Per (batch x query head, segment of rows first_row .. last_row - 1, TILE columns of [code || v]): the
        causal kernel attention of those columns for the segment's rows, continued from the segment's starting
        sums, written into ESTIMATE (N x H, last_row - first_row, 2D) in its dtype."""
        head = tl.program_id(0).to(tl.int64)
        segment = tl.program_id(1)
        column = tl.program_id(2) * TILE
        batch = head // num_heads
        kv_head = _key_value_head(head, num_heads, group)
        first = first_row + segment * segment_rows
        last = tl.minimum(first + segment_rows, last_row)
        estimate_rows = last_row - first_row
        from_x, from_k, _ = _packed_sums(START, kv_head * num_segments + segment, column, HEAD_DIM, BLOCK_F, TILE)
        sum_x = tl.load(from_x)
        sum_k = tl.load(from_k)
        columns = tl.arange(0, TILE)
        for chunk in range(first, last, CHUNK):
            rows, row_ok, valid = _chunk_rows(VALID, batch, chunk, last, num_rows, CHUNK)
            phi_q, phi_k, within, denominator = _chunk_kernel_products(
                Q, K, PROJECTION, head, kv_head, rows, row_ok, valid, sum_k, num_rows, num_features, scale, eps,
                HEAD_DIM, BLOCK_F, CHUNK, SUMS_PRECISION)
            x = _augmented_columns(CODE, V, batch, kv_head, rows, row_ok, column, num_rows, HEAD_DIM, TILE)
            estimate = (tl.dot(phi_q, sum_x, input_precision=SUMS_PRECISION)
                        + tl.dot(within, x, input_precision=SUMS_PRECISION)) / denominator
            tl.store(ESTIMATE + (head * estimate_rows + rows - first_row)[:, None] * (2 * HEAD_DIM) + column
                     + columns[None, :], estimate.to(ESTIMATE.dtype.element_ty), mask=row_ok[:, None])
            sum_x += tl.dot(tl.trans(phi_k), x, input_precision=SUMS_PRECISION)
            sum_k += tl.sum(phi_k, axis=0)

    @triton.jit
    def _encoder_weight_t(W, column, HEAD_DIM: tl.constexpr):
        """Columns column .. column + D - 1 of the encoder's first weight (2D, 3D), transposed: (D, 2D)."""
        dims = tl.arange(0, HEAD_DIM)
        outputs = tl.arange(0, 2 * HEAD_DIM)
        return tl.load(W + outputs[None, :] * (3 * HEAD_DIM) + column + dims[:, None])

    @triton.jit
    def _store_output_gate(GATE_W, GATE_B, GATE_SCALE, GATE_OFFSET, COUNTS, encoded, valid_values, sum_v, out_rows,
                           count_rows, row_ok, HEAD_DIM: tl.constexpr):
        """`SeaAttention.output_gate` of a chunk of rows: the scale 2 sigmoid(g_0) and the offset tanh(g_1) times
        the running mean of the valid values (`causal_average_context`; `valid_values` are the chunk's values, zero
        at padding, and `sum_v` sums those before the chunk)."""
        dims = tl.arange(0, HEAD_DIM)
        outputs = tl.arange(0, 2 * HEAD_DIM)
        logit_scale = tl.sum(encoded * tl.load(GATE_W + outputs).to(tl.float32)[None, :], axis=1) + tl.load(GATE_B)
        logit_mix = (tl.sum(encoded * tl.load(GATE_W + 2 * HEAD_DIM + outputs).to(tl.float32)[None, :], axis=1)
                     + tl.load(GATE_B + 1))
        through = sum_v[None, :] + tl.cumsum(valid_values, axis=0)
        count = tl.load(COUNTS + count_rows, mask=row_ok, other=1).to(tl.float32)
        average = (through / tl.maximum(count, 1.0)[:, None]).to(GATE_OFFSET.dtype.element_ty).to(tl.float32)
        mix = 2.0 * tl.sigmoid(2.0 * logit_mix) - 1.0  # tanh
        tl.store(GATE_SCALE + out_rows, 2.0 * tl.sigmoid(logit_scale), mask=row_ok)
        tl.store(GATE_OFFSET + out_rows[:, None] * HEAD_DIM + dims[None, :],
                 (mix[:, None] * average).to(GATE_OFFSET.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _encode_chunk(est_code, est_value, value_in, valid, rows, row_ok, sum_v, head, batch, num_rows, num_slots,
                      W, BIAS, NORM_W, NORM_B, norm_eps, GATE_W, GATE_B, COUNTS, ROW_SLOT, ENCODING, GATE_SCALE,
                      GATE_OFFSET, HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                      HAS_GATES: tl.constexpr):
        """The encoder (linear, layer norm, GELU) of a chunk's rows [est_code || est_value || v] (the estimate in
        the values' dtype), stored into ENCODING for the rows that have a slot in ROW_SLOT; with gates, the rows'
        output gate. Returns `sum_v` (the valid values before the chunk) plus the chunk's valid values."""
        outputs = tl.arange(0, 2 * HEAD_DIM)
        hidden = tl.dot(est_code.to(DOT_DTYPE), _encoder_weight_t(W, 0, HEAD_DIM).to(DOT_DTYPE),
                        input_precision=PRECISION)
        hidden += tl.dot(est_value.to(DOT_DTYPE), _encoder_weight_t(W, HEAD_DIM, HEAD_DIM).to(DOT_DTYPE),
                         input_precision=PRECISION)
        hidden += tl.dot(value_in.to(DOT_DTYPE), _encoder_weight_t(W, 2 * HEAD_DIM, HEAD_DIM).to(DOT_DTYPE),
                         input_precision=PRECISION)
        hidden += tl.load(BIAS + outputs).to(tl.float32)[None, :]
        mean = tl.sum(hidden, axis=1)[:, None] / (2 * HEAD_DIM)
        centred = hidden - mean
        variance = tl.sum(centred * centred, axis=1)[:, None] / (2 * HEAD_DIM)
        normed = (centred / tl.sqrt(variance + norm_eps) * tl.load(NORM_W + outputs).to(tl.float32)[None, :]
                  + tl.load(NORM_B + outputs).to(tl.float32)[None, :])
        encoded = (0.5 * normed * (1.0 + tl.erf(normed * 0.7071067811865476))).to(ENCODING.dtype.element_ty)
        slot = tl.load(ROW_SLOT + rows, mask=row_ok, other=-1)
        tl.store(ENCODING + (head * num_slots + slot)[:, None] * (2 * HEAD_DIM) + outputs[None, :], encoded,
                 mask=(slot >= 0)[:, None])
        if HAS_GATES:
            valid_values = tl.where(valid[:, None], value_in.to(tl.float32), 0.0)
            _store_output_gate(GATE_W, GATE_B, GATE_SCALE, GATE_OFFSET, COUNTS, encoded.to(tl.float32), valid_values,
                               sum_v, head * num_rows + rows, batch * num_rows + rows, row_ok, HEAD_DIM)
            sum_v += tl.sum(valid_values, axis=0)
        return sum_v

    @triton.jit
    def _causal_kernel_encoding(
        Q, K, V, CODE, VALID, COUNTS, PROJECTION, START, W, BIAS, NORM_W, NORM_B,
        GATE_W, GATE_B, ROW_SLOT, ENCODING, GATE_SCALE, GATE_OFFSET, num_rows, num_slots, segment_rows, num_segments,
        num_features, num_heads, group, scale, eps, norm_eps,
        HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr, CHUNK: tl.constexpr, SUMS_PRECISION: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, HAS_GATES: tl.constexpr,
    ):
        """Per (batch x query head, segment): causal kernel attention of [code || v] from the segment's starting
        sums, then the encoder (linear, layer norm, GELU) of [estimate || v], written as ENCODING (slots, 2D) for
        the rows that have a slot in ROW_SLOT; with gates, also the output gate of every row: GATE_SCALE (rows)
        and GATE_OFFSET (rows, D), the mix gate times the running mean of the valid values."""
        head = tl.program_id(0).to(tl.int64)
        segment = tl.program_id(1)
        batch = head // num_heads
        kv_head = _key_value_head(head, num_heads, group)
        first = segment * segment_rows
        last = tl.minimum(first + segment_rows, num_rows)
        from_code, from_k, from_values = _packed_sums(START, kv_head * num_segments + segment, 0, HEAD_DIM, BLOCK_F,
                                                      HEAD_DIM)
        sum_code = tl.load(from_code)
        sum_value = tl.load(from_code + HEAD_DIM)
        sum_k = tl.load(from_k)
        sum_v = tl.load(from_values + tl.arange(0, HEAD_DIM))
        for chunk in range(first, last, CHUNK):
            rows, row_ok, valid = _chunk_rows(VALID, batch, chunk, last, num_rows, CHUNK)
            phi_q, phi_k, within, denominator = _chunk_kernel_products(
                Q, K, PROJECTION, head, kv_head, rows, row_ok, valid, sum_k, num_rows, num_features, scale, eps,
                HEAD_DIM, BLOCK_F, CHUNK, SUMS_PRECISION)
            code = _matrix_rows(CODE, batch * num_rows, rows, row_ok, HEAD_DIM).to(tl.float32)
            value_in = _matrix_rows(V, kv_head * num_rows, rows, row_ok, HEAD_DIM)
            value = value_in.to(tl.float32)
            est_code = (tl.dot(phi_q, sum_code, input_precision=SUMS_PRECISION)
                        + tl.dot(within, code, input_precision=SUMS_PRECISION))
            est_value = (tl.dot(phi_q, sum_value, input_precision=SUMS_PRECISION)
                         + tl.dot(within, value, input_precision=SUMS_PRECISION))
            sum_code += tl.dot(tl.trans(phi_k), code, input_precision=SUMS_PRECISION)
            sum_value += tl.dot(tl.trans(phi_k), value, input_precision=SUMS_PRECISION)
            sum_k += tl.sum(phi_k, axis=0)
            # The encoder reads the estimate in the values' precision, as the PyTorch path does.
            sum_v = _encode_chunk(
                (est_code / denominator).to(V.dtype.element_ty), (est_value / denominator).to(V.dtype.element_ty),
                value_in, valid, rows, row_ok, sum_v, head, batch, num_rows, num_slots, W, BIAS, NORM_W, NORM_B,
                norm_eps, GATE_W, GATE_B, COUNTS, ROW_SLOT, ENCODING, GATE_SCALE, GATE_OFFSET, HEAD_DIM, DOT_DTYPE,
                PRECISION, HAS_GATES)

    @triton.jit
    def _causal_estimate_encoding(
        ESTIMATE, V, VALID, COUNTS, START, W, BIAS, NORM_W, NORM_B, GATE_W, GATE_B, ROW_SLOT, ENCODING, GATE_SCALE,
        GATE_OFFSET, num_rows, first_row, last_row, num_slots, segment_rows, num_segments, num_heads, group,
        norm_eps, HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr, CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr, HAS_GATES: tl.constexpr,
    ):
        """`_causal_kernel_encoding`'s encoder and gates for rows first_row .. last_row - 1 whose estimate
        `_causal_kernel_estimate` wrote into ESTIMATE, per (batch x query head, segment); the running sums of the
        valid values start from the segments' packed records."""
        head = tl.program_id(0).to(tl.int64)
        segment = tl.program_id(1)
        batch = head // num_heads
        kv_head = _key_value_head(head, num_heads, group)
        first = first_row + segment * segment_rows
        last = tl.minimum(first + segment_rows, last_row)
        estimate_rows = last_row - first_row
        _, _, from_values = _packed_sums(START, kv_head * num_segments + segment, 0, HEAD_DIM, BLOCK_F, HEAD_DIM)
        sum_v = tl.load(from_values + tl.arange(0, HEAD_DIM))
        for chunk in range(first, last, CHUNK):
            rows, row_ok, valid = _chunk_rows(VALID, batch, chunk, last, num_rows, CHUNK)
            estimate_base = head * 2 * estimate_rows - 2 * first_row  # in rows of D: estimate rows hold 2D
            est_code = _matrix_rows(ESTIMATE, estimate_base, 2 * rows, row_ok, HEAD_DIM)
            est_value = _matrix_rows(ESTIMATE, estimate_base, 2 * rows + 1, row_ok, HEAD_DIM)
            value_in = _matrix_rows(V, kv_head * num_rows, rows, row_ok, HEAD_DIM)
            sum_v = _encode_chunk(est_code, est_value, value_in, valid, rows, row_ok, sum_v, head, batch, num_rows,
                                  num_slots, W, BIAS, NORM_W, NORM_B, norm_eps, GATE_W, GATE_B, COUNTS, ROW_SLOT,
                                  ENCODING, GATE_SCALE, GATE_OFFSET, HEAD_DIM, DOT_DTYPE, PRECISION, HAS_GATES)

    # Launch shape of the estimate kernels, measured once per head size on the GPU (the interpreter ignores it).
    ESTIMATE_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)]
    _estimate_sums_tuned = triton.autotune(
        ESTIMATE_CONFIGS, key=["HEAD_DIM", "BLOCK_F", "TILE", "SUMS_PRECISION"])(_causal_kernel_sums)
    _estimate_columns_tuned = triton.autotune(
        ESTIMATE_CONFIGS, key=["HEAD_DIM", "BLOCK_F", "TILE", "SUMS_PRECISION"])(_causal_kernel_estimate)
    _estimate_encoder_tuned = triton.autotune(
        ESTIMATE_CONFIGS, key=["HEAD_DIM", "BLOCK_F", "DOT_DTYPE", "HAS_GATES"])(_causal_estimate_encoding)
    _estimate_encoding_tuned = triton.autotune(
        ESTIMATE_CONFIGS, key=["HEAD_DIM", "BLOCK_F", "DOT_DTYPE", "SUMS_PRECISION", "HAS_GATES"])(
        _causal_kernel_encoding)


BLOCK_M = 32  # query rows per program of the per-query kernel
INTERPRETER_BLOCK_N = 64  # keys per tile of the block kernels in Triton's interpreter, which cannot time configs


def _kernel_for_device(kernel, tuned, on_gpu: bool, arguments: dict, **interpreter_arguments):
    """The autotuned kernel and `arguments` on a GPU; under the interpreter, which cannot time configs, the plain
    kernel with `interpreter_arguments` fixing what the autotuner would choose."""
    if on_gpu:
        return tuned, arguments
    return kernel, {**arguments, **interpreter_arguments}


def _dot_arguments(x: torch.Tensor) -> dict:
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


def _block_forward(q, k, v, starts, lengths, positions, counts, rows_per_block, slots, scaling, need_probs, out,
                   gate_scale=None):
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
                     GATHER=gather, **_dot_arguments(q))
    if t > 0:
        kernel, launch = _kernel_for_device(_block_sparse_forward, _block_forward_tuned, q.is_cuda, arguments,
                                            BLOCK_N=INTERPRETER_BLOCK_N)
        kernel[(triton.cdiv(t, rows_per_block), n * h)](
            q, k, v, starts, lengths, positions, counts, out, lse, probs, gate_scale if gate_scale is not None else lse,
            t, k.shape[2], k.stride(1), starts.shape[-1], slots, scaling, h, h // k.shape[1], NEED_PROBS=need_probs,
            GATED=gate_scale is not None, **launch,
        )
    return arguments, (starts, lengths, positions, counts), lse, probs


class _BlockSparseAttention(torch.autograd.Function):
    """A block of queries sharing its key ranges per program: tiles of keys go through matrix products
    (sea_query_block_size > 1)."""

    @staticmethod
    def forward(ctx, q, k, v, starts, lengths, positions, counts, rows_per_block, slots, scaling, need_probs):
        q, (k, v) = q.contiguous(), _read_in_place(k, v)
        out = torch.empty_like(q)
        arguments, ranges, lse, probs = _block_forward(q, k, v, starts, lengths, positions, counts, rows_per_block,
                                                       slots, scaling, need_probs, out)
        ctx.save_for_backward(q, k, v, *ranges, out, probs, lse)
        ctx.setup = (slots, scaling, arguments)
        return (probs if need_probs else None), out

    @staticmethod
    def backward(ctx, grad_probs, grad_out):
        q, k, v, starts, lengths, positions, counts, out, probs, lse = ctx.saved_tensors
        k, v = k.contiguous(), v.contiguous()  # laid out as their gradients
        slots, scaling, arguments = ctx.setup
        n, h, t, d = q.shape
        grad_out, grad_probs, delta = _backward_prologue(out, probs, grad_probs, grad_out)
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        if t > 0:
            kernel, launch = _kernel_for_device(_block_sparse_backward, _block_backward_tuned, q.is_cuda, arguments,
                                                BLOCK_N=INTERPRETER_BLOCK_N)
            kernel[(triton.cdiv(t, arguments["BLOCK_M"]), n * h)](
                q, k, v, starts, lengths, positions, counts, lse, delta, grad_out,
                grad_probs if grad_probs is not None else grad_out, grad_q, grad_k, grad_v,
                t, k.shape[2], k.stride(1), starts.shape[-1], slots, scaling, h, h // k.shape[1],
                HAS_GRAD_PROBS=grad_probs is not None, **launch,
            )
        return (grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)) + (None,) * 8


DECODE_MAX_ROWS = 16  # up to this many query rows (decode steps), per-query selections use the split kernel
DECODE_SPLIT_SLOTS = 128  # slots per program of the split kernel: a 1024-key budget gives 8 programs per row
DECODE_TILE_SLOTS = 64  # slots a split-kernel program reads at once (DECODE_SPLIT_SLOTS is a multiple)


def _decoded_attention(q, k, v, selection, scaling: float) -> torch.Tensor:
    """Context of a few queries with per-query selections, for inference (no probabilities, no backward). The
    per-slot kernel gives each program a block of query rows and walks the slots one by one: with one row per head
    (a decode step) a handful of programs each walk ~1000 dependent loads. Here every row's slots are cut into
    shares of `DECODE_SPLIT_SLOTS` that programs walk in tiles side by side (their ranges read directly, no
    per-slot index), then a second kernel merges the shares' online softmax."""
    q, (k, v) = q.contiguous(), _read_in_place(k, v)
    n, h, t, d = q.shape
    starts, lengths, counts = (x.to(torch.int32).contiguous() for x in (selection.starts, selection.lengths,
                                                                        selection.row_counts))
    gather = selection.key_positions is not None
    positions = selection.key_positions.to(torch.int32).contiguous() if gather else counts
    splits = max(1, triton.cdiv(selection.slots, DECODE_SPLIT_SLOTS))
    block_d = max(16, triton.next_power_of_2(d))
    partial = torch.empty(n * h * t, splits, block_d + 2, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    num_ranges = starts.shape[-1]
    if t > 0 and num_ranges > 0:
        _sparse_decode_split[(n * h * t, splits)](
            q, k, v, starts, lengths, positions, counts, partial, t, k.shape[2], k.stride(1), num_ranges,
            DECODE_SPLIT_SLOTS, scaling, h, h // k.shape[1], HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=DECODE_TILE_SLOTS,
            BLOCK_R=max(16, triton.next_power_of_2(num_ranges)), GATHER=gather,
        )
        _sparse_decode_combine[(n * h * t,)](partial, out, splits, HEAD_DIM=d, BLOCK_D=block_d,
                                             BLOCK_S=max(2, triton.next_power_of_2(splits)))
    else:
        out.zero_()
    return out


def gated_block_attention_triton(q, k, v, selection, scaling: float, scale: torch.Tensor, offset: torch.Tensor):
    """For inference with query blocks and no probabilities: scale x `sparse_attention_triton`'s context + offset
    (the output gate), written by the kernel into `offset`'s memory, which the caller gives up: no other buffer of
    the output's size is allocated. scale (N, H, T, 1) float32, offset (N, H, T, D) contiguous, in q's dtype."""
    _block_forward(q.contiguous(), *_read_in_place(k, v), selection.starts, selection.lengths,
                   selection.key_positions, selection.row_counts, selection.rows_per_block, 0, scaling, False, offset,
                   scale)
    return offset


def sparse_attention_triton(q, k, v, selection, scaling: float, need_probs: bool = True):
    """`sea_attention.sparse_attention` as a Triton kernel: (probabilities (N, H, T, S) or None when not
    `need_probs`, context (N, H, T, D)). k and v may have fewer heads than q (grouped-query attention); they are
    read in place, never repeated. Blocks of queries sharing their keys run through matrix products; single-query
    selections through a per-slot kernel."""
    if selection.rows_per_block == 1:
        differentiable = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        if not need_probs and not differentiable and q.shape[2] <= DECODE_MAX_ROWS:
            return None, _decoded_attention(q, k, v, selection, scaling)
        probs, context = _SparseAttention.apply(q, k, v, *selection.per_row, scaling)
        return (probs if need_probs else None), context
    return _BlockSparseAttention.apply(
        q, k, v, selection.starts, selection.lengths, selection.key_positions, selection.row_counts,
        selection.rows_per_block, selection.slots if need_probs else 0, scaling, need_probs,
    )


ESTIMATE_CHUNK = 64  # rows per step of the estimate kernels' walk (as LINEAR_ATTENTION_CHUNK in the PyTorch path)
ESTIMATE_PROGRAMS = 512  # rows are cut into segments until (batch x head, segment) programs fill a large GPU
FUSED_ESTIMATE_HEAD_DIM = 64  # one program holds a head's (F, 2D) sums and the encoder's weights only up to here
ESTIMATE_TILE = 64  # columns of [code || v] per program of the segment sums and of the column-split estimate
ESTIMATE_PASS_ROWS = 4096  # rows per pass of the column-split kernels: their (N, H, rows, 2D) estimate is reused


def estimate_kernel_unavailable_reason(q: torch.Tensor, head_dim: int) -> str | None:
    """Why `causal_kernel_encoding_triton` cannot serve these queries, or None when it can. (It has no backward:
    callers use it only when no gradient is wanted.)"""
    reason = kernel_unavailable_reason(q)
    if reason is not None:
        return reason
    # Other sizes fail to compile or fill shared memory (benchmarks/results/kernel_notes.md).
    if head_dim not in (64, 128):
        return f"head_dim {head_dim} is not 64 or 128"
    # The float32 encoder at head_dim 128 needs more shared memory than a block gets (kernel_notes.md).
    if head_dim == 128 and q.dtype == torch.float32:
        return "float32 at head_dim 128 needs more shared memory than a GPU has; bfloat16 and float16 run them"
    return None


def _estimate_precision(x: torch.Tensor) -> str:
    """Precision of the estimate kernels' float32 products (the kernel attention and, for float32 inputs, the
    encoder): exact in the interpreter; on the GPU's matrix units, three TF32 passes (float32 accuracy) for float32
    inputs and one pass for half-precision inputs, whose operands TF32 holds with more mantissa than they had;
    exact float32 products compile for minutes per launch config on a GPU (benchmarks/results/kernel_notes.md)."""
    if not x.is_cuda:
        return "ieee"
    return "tf32x3" if x.dtype == torch.float32 else "tf32"


def _pack_sums(kv_sum, k_sum, value_sum, block_f: int) -> torch.Tensor:
    """The carried sums (N, H_kv, F, 2D), (N, H_kv, F), (N, H_kv, D) as one float32 record per (batch, key/value
    head), features padded to `block_f`, the layout the estimate kernels read and write (`_packed_sums`)."""
    pad = block_f - kv_sum.shape[-2]
    parts = (F.pad(kv_sum, (0, 0, 0, pad)).flatten(-2), F.pad(k_sum, (0, pad)), value_sum)
    return torch.cat(parts, dim=-1).flatten(0, 1).float()


def _estimate_segments(t: int, programs_per_segment: int) -> tuple[int, int]:
    """How many segments, and rows per segment, to cut T rows into (whole chunks) so that the estimate kernels' grid
    fills a large GPU."""
    segments = max(1, min(triton.cdiv(t, ESTIMATE_CHUNK), triton.cdiv(ESTIMATE_PROGRAMS, programs_per_segment)))
    segment_rows = ESTIMATE_CHUNK * max(1, triton.cdiv(t, ESTIMATE_CHUNK * segments))
    return max(1, triton.cdiv(t, segment_rows)), segment_rows


def _segment_start_sums(k, v, code, key_valid, projection, eps, record, block_f: int, first: int, last: int,
                        segments: int, segment_rows: int):
    """The packed sums (`_pack_sums`) before each segment of rows first .. last - 1, (N x H_kv, segments, record),
    and after row last - 1, (N x H_kv, record): `_causal_kernel_sums` sums each segment, a prefix over segments
    adds them to `record`, the packed sums before row `first`."""
    n, kv_heads, t, d = k.shape
    tile = min(ESTIMATE_TILE, d)
    kernel, arguments = _kernel_for_device(
        _causal_kernel_sums, _estimate_sums_tuned, k.is_cuda,
        dict(HEAD_DIM=d, BLOCK_F=block_f, TILE=tile, CHUNK=ESTIMATE_CHUNK,
             SUMS_PRECISION=_estimate_precision(k)))
    segment_sums = record.new_empty(n * kv_heads, segments, record.shape[-1])
    kernel[(n * kv_heads, segments, 2 * d // tile)](
        k, v, code, key_valid, projection, segment_sums, t, first, last, segment_rows, segments, projection.shape[0],
        kv_heads, d**-0.25, eps, **arguments,
    )
    start = record.unsqueeze(1) + segment_sums.cumsum(1) - segment_sums
    return start, record + segment_sums.sum(1)


def causal_kernel_encoding_triton(q, k, v, code, key_valid, counts, projection, encoder, gates, eps, kv_sum, k_sum,
                                  value_sum, rows=None):
    """The causal part of `SeaAttention.kernel_encoding` as Triton kernels, for inference: the encoding
    (N, H, R, 2D) of [kernel attention of [code || v] || v] at `rows` (R of the T rows; None: all), the new sums
    (kv_sum, k_sum, value_sum) after these rows, and with `gates` (the gate layer, or None) the output gate of
    every row (`SeaAttention.output_gate`): scale (N, H, T, 1) and offset (N, H, T, D).

    q (N, H, T, D), k and v (N, H_kv, T, D) of the new rows, code (N, T, D), key_valid (N, T), the visible-key
    counts (N, T) and the sums before these rows (N, H_kv, F, 2D), (N, H_kv, F), (N, H_kv, D). Rows are cut into
    segments: a first kernel sums phi(k) [code || v]^T, phi(k) and the valid v per segment, and a prefix over
    segments gives each segment's starting sums. At head_dim 64 a second kernel then walks each segment in chunks,
    carrying the sums in registers, and encodes and gates every row as soon as it is estimated: neither the
    features, the estimate nor the encoding of other rows reach memory. Larger heads' sums and encoder weights
    outgrow one program: there programs split the estimate by 64 columns of [code || v] (each recomputing its
    rows' features), write it for a pass of `ESTIMATE_PASS_ROWS` rows, and a third kernel encodes and gates the
    pass. Raises Triton's OutOfResources when the kernels need more shared memory than this GPU has."""
    n, h, t, d = q.shape
    kv_heads, f = k.shape[1], projection.shape[0]
    block_f = max(16, triton.next_power_of_2(f))
    q, k, v, code, key_valid, counts, projection = (
        x.contiguous() for x in (q, k, v, code, key_valid, counts, projection))
    # Where each row's encoding goes: its index among `rows`, or -1 when it is not wanted.
    if rows is None:
        row_slot = torch.arange(t, dtype=torch.int32, device=q.device)
    else:
        row_slot = torch.full((t,), -1, dtype=torch.int32, device=q.device)
        row_slot[rows] = torch.arange(rows.shape[0], dtype=torch.int32, device=q.device)
    encoding = torch.empty(n, h, t if rows is None else rows.shape[0], 2 * d, dtype=v.dtype, device=q.device)
    if gates is not None:
        scale = torch.empty(n, h, t, 1, dtype=torch.float32, device=q.device)
        offset = torch.empty(n, h, t, d, dtype=v.dtype, device=q.device)
        gate_weight, gate_bias = gates.weight.contiguous(), gates.bias
    else:  # never read: the kernels write no gate
        scale = offset = gate_weight = gate_bias = encoding
    first_layer, norm = encoder[0], encoder[1]
    encoder_arguments = (first_layer.weight.contiguous(), first_layer.bias, norm.weight, norm.bias, gate_weight,
                         gate_bias, row_slot, encoding, scale, offset)
    estimate_precision = _estimate_precision(q)
    encoding_constants = dict(HEAD_DIM=d, BLOCK_F=block_f, CHUNK=ESTIMATE_CHUNK, HAS_GATES=gates is not None,
                              DOT_DTYPE=_dot_arguments(v)["DOT_DTYPE"], PRECISION=estimate_precision)
    record = _pack_sums(kv_sum, k_sum, value_sum, block_f)  # (N x H_kv, record): the sums before the next row
    if d == FUSED_ESTIMATE_HEAD_DIM:
        segments, segment_rows = _estimate_segments(t, n * h)
        start, record = _segment_start_sums(k, v, code, key_valid, projection, eps, record, block_f, 0, t, segments,
                                            segment_rows)
        kernel, arguments = _kernel_for_device(
            _causal_kernel_encoding, _estimate_encoding_tuned, q.is_cuda,
            dict(encoding_constants, SUMS_PRECISION=estimate_precision))
        kernel[(n * h, segments)](
            q, k, v, code, key_valid, counts, projection, start, *encoder_arguments, t, encoding.shape[2],
            segment_rows, segments, f, h, h // kv_heads, d**-0.25, eps, norm.eps, **arguments,
        )
    else:
        tile = min(ESTIMATE_TILE, d)
        estimate_kernel, estimate_arguments = _kernel_for_device(
            _causal_kernel_estimate, _estimate_columns_tuned, q.is_cuda,
            dict(HEAD_DIM=d, BLOCK_F=block_f, TILE=tile, CHUNK=ESTIMATE_CHUNK, SUMS_PRECISION=estimate_precision))
        encoder_kernel, encoder_arguments_tuned = _kernel_for_device(
            _causal_estimate_encoding, _estimate_encoder_tuned, q.is_cuda, encoding_constants)
        estimate = torch.empty(n * h * min(t, ESTIMATE_PASS_ROWS) * 2 * d, dtype=v.dtype, device=q.device)
        for first in range(0, t, ESTIMATE_PASS_ROWS):
            last = min(t, first + ESTIMATE_PASS_ROWS)
            segments, segment_rows = _estimate_segments(last - first, n * h * 2 * d // tile)
            start, record = _segment_start_sums(k, v, code, key_valid, projection, eps, record, block_f, first, last,
                                                segments, segment_rows)
            estimate_kernel[(n * h, segments, 2 * d // tile)](
                q, k, v, code, key_valid, projection, start, estimate, t, first, last, segment_rows, segments, f, h,
                h // kv_heads, d**-0.25, eps, **estimate_arguments,
            )
            encoder_kernel[(n * h, segments)](
                estimate, v, key_valid, counts, start, *encoder_arguments, t, first, last, encoding.shape[2],
                segment_rows, segments, h, h // kv_heads, norm.eps, **encoder_arguments_tuned,
            )
    kv_part, k_part, v_part = record.view(n, kv_heads, -1).split([2 * block_f * d, block_f, d], dim=-1)
    sums = (kv_part.unflatten(-1, (block_f, 2 * d))[:, :, :f], k_part[..., :f], v_part)
    return encoding, sums, ((scale, offset) if gates is not None else None)
