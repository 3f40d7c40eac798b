"""Triton kernels: drop-in accelerations of functions in `sea_attention.py`, tested against them.

`sparse_attention_triton` computes exactly what `sea_attention.sparse_attention` computes (softmax of each query
over its selected keys; probabilities and context), forward and backward, without gathering the selected keys and
values into memory: each program takes a block of query rows of one head, walks their slots, loads the selected
key/value rows straight from K and V, and keeps an online softmax in float32. The backward recomputes the
probabilities from the saved log-sum-exp and scatters key/value gradients with atomic adds (a key is shared by
many queries).

Triton is optional: on the CPU the PyTorch path runs (the kernels run there only under TRITON_INTERPRET=1, as the
tests do).
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path serves; `kernel_unavailable_reason` says why no kernel runs
    triton = None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
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
    return None


if triton is not None:
    _EMPTY = tl.constexpr(EMPTY_ROW)

    @triton.jit
    def _key_value_head(head, num_heads, group):
        """Flattened (batch, key/value head) read by flattened (batch, query head) `head`: query heads come in
        groups of `group` per key/value head (grouped-query attention; 1 for multi-head attention)."""
        return (head // num_heads) * (num_heads // group) + (head % num_heads) // group

    @triton.jit
    def _sparse_forward(
        Q, K, V, INDEX, VALID, OUT, PROBS, LSE,
        num_queries, num_keys, slots, scaling, num_heads, group,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        head = tl.program_id(1)  # flattened (batch, head)
        row_ok = rows < num_queries
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        tile_ok = row_ok[:, None] & dim_ok[None, :]
        q_rows = head * num_queries + rows  # row offsets into the (N*H*T, D) views of Q, OUT
        kv_base = _key_value_head(head, num_heads, group) * num_keys
        slot_base = q_rows * slots
        q = tl.load(Q + q_rows[:, None] * HEAD_DIM + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)

        # Pass 1: running max and normaliser of the scores over the valid slots.
        running_max = tl.full([BLOCK_M], -_EMPTY, tl.float32)
        normaliser = tl.zeros([BLOCK_M], tl.float32)
        for s in range(0, slots):
            ok = (tl.load(VALID + slot_base + s, mask=row_ok, other=0) != 0) & row_ok
            key = tl.load(INDEX + slot_base + s, mask=ok, other=0)
            k = tl.load(K + (kv_base + key)[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None] & dim_ok[None, :],
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
            kv_offsets = (kv_base + key)[:, None] * HEAD_DIM + dims[None, :]
            k = tl.load(K + kv_offsets, mask=ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            v = tl.load(V + kv_offsets, mask=ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            p = tl.where(ok, tl.exp(tl.sum(q * k, axis=1) * scaling - lse), 0.0)
            tl.store(PROBS + slot_base + s, p.to(PROBS.dtype.element_ty), mask=row_ok)
            context += p[:, None] * v
        tl.store(OUT + q_rows[:, None] * HEAD_DIM + dims[None, :], context.to(OUT.dtype.element_ty), mask=tile_ok)

    @triton.jit
    def _sparse_backward(
        Q, K, V, INDEX, VALID, LSE, GRAD_OUT, GRAD_PROBS, DELTA, GRAD_Q, GRAD_K, GRAD_V,
        num_queries, num_keys, slots, scaling, num_heads, group,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GRAD_PROBS: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        head = tl.program_id(1)
        row_ok = rows < num_queries
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        tile_ok = row_ok[:, None] & dim_ok[None, :]
        q_rows = head * num_queries + rows
        kv_base = _key_value_head(head, num_heads, group) * num_keys
        slot_base = q_rows * slots
        q = tl.load(Q + q_rows[:, None] * HEAD_DIM + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        grad_out = tl.load(GRAD_OUT + q_rows[:, None] * HEAD_DIM + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        lse = tl.load(LSE + q_rows, mask=row_ok, other=_EMPTY)
        delta = tl.load(DELTA + q_rows, mask=row_ok, other=0.0)
        grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for s in range(0, slots):
            ok = (tl.load(VALID + slot_base + s, mask=row_ok, other=0) != 0) & row_ok
            key = tl.load(INDEX + slot_base + s, mask=ok, other=0)
            kv_offsets = (kv_base + key)[:, None] * HEAD_DIM + dims[None, :]
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


BLOCK_M = 32


def _grid(q):
    n, h, t, _ = q.shape
    return (triton.cdiv(t, BLOCK_M), n * h)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_index, key_valid, scaling):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        key_index, key_valid = key_index.contiguous(), key_valid.contiguous()
        n, h, t, d = q.shape
        slots = key_index.shape[-1]
        out = torch.empty_like(q)
        probs = torch.empty(n, h, t, slots, dtype=v.dtype, device=q.device)
        lse = torch.empty(n, h, t, dtype=torch.float32, device=q.device)
        if slots > 0 and t > 0:
            _sparse_forward[_grid(q)](
                q, k, v, key_index, key_valid, out, probs, lse, t, k.shape[2], slots, scaling, h, h // k.shape[1],
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
        n, h, t, d = q.shape
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        # sum_s P_s dL/dP_s, with dL/dP_s = grad_out . v_s + grad_probs_s.
        delta = (grad_out.float() * out.float()).sum(-1)
        if grad_probs is not None:
            grad_probs = grad_probs.contiguous()
            delta = delta + (grad_probs.float() * probs.float()).sum(-1)
        grad_q = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        if key_index.shape[-1] > 0 and t > 0:
            _sparse_backward[_grid(q)](
                q, k, v, key_index, key_valid, lse, grad_out, grad_probs if grad_probs is not None else grad_out,
                delta.contiguous(), grad_q, grad_k, grad_v, t, k.shape[2], key_index.shape[-1], ctx.scaling, h,
                h // k.shape[1],
                HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_D=triton.next_power_of_2(d), HAS_GRAD_PROBS=grad_probs is not None,
            )
        else:
            grad_q.zero_()
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def sparse_attention_triton(q, k, v, selection, scaling: float):
    """`sea_attention.sparse_attention` as a Triton kernel: (probabilities (N, H, T, S), context (N, H, T, D)).
    k and v may have fewer heads than q (grouped-query attention); they are read in place, never repeated."""
    return _SparseAttention.apply(q, k, v, selection.key_index, selection.key_valid, scaling)
