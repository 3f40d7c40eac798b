"""Which implementation serves each SEA step: the only module that imports the Triton kernels.

It decides from explicit inputs only: the tensors (device, dtype, head size, batch x heads), the config's
`sea_kernel` ("auto": the kernels on CUDA where they can run, "triton": forced, an error where they cannot,
"torch": the PyTorch reference), whether the call is inference (no gradient wanted, as the layer reads it once:
see `sea_layer`) and the attention dropout. It owns every reason a kernel cannot run, the one warning per reason
when "auto" falls back to PyTorch, and the errors of a forced kernel:

* the sparse attention: the Triton kernel where `kernel_unavailable_reason` has no reason and no dropout is asked
  for; among the kernels, query blocks take the block kernel (with the output gate applied as it writes, at
  inference without probabilities), per-query selections the split kernel at inference without probabilities
  (lean: no per-slot index or probability buffer), the per-slot kernel otherwise;
* the causal estimate at inference: the Triton kernels (fused at head_dim 64, split by columns at 128) where
  `estimate_kernel_unavailable_reason` has no reason and they fit in shared memory; else the PyTorch reference, in
  passes of rows for a long input. Training and bidirectional layers take the PyTorch reference in one pass.
"""

import os

import torch
from transformers.utils import logging

from .sea_attention import (
    ESTIMATE_ROWS_PER_PASS,
    FEATURE_EPS,
    EstimatorWeights,
    SeaSelection,
    gated,
    kernel_encoding,
    kernel_encoding_in_passes,
    sparse_attention,
)

try:  # Triton is optional (CPU and Mac users): without it every step takes the PyTorch reference
    from .sea_estimate_kernels import FUSED_ESTIMATE_HEAD_DIM, OutOfResources, causal_kernel_encoding_triton
    from .sea_sparse_kernels import (
        block_sparse_attention,
        gated_block_attention,
        per_query_inference_attention,
        per_query_sparse_attention,
    )

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False

logger = logging.get_logger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension


def kernel_unavailable_reason(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot serve these queries, or None when they can."""
    if not TRITON_AVAILABLE:
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


def estimate_kernel_unavailable_reason(q: torch.Tensor, head_dim: int) -> str | None:
    """Why the estimate kernels cannot serve these queries, or None when they can. (They have no backward: they
    serve inference only.)"""
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


def sparse_kernel_serves(q: torch.Tensor, kernel: str, dropout: float = 0.0) -> bool:
    """Whether the Triton kernel computes the sparse attention of these queries under `sea_kernel` (and an
    attention `dropout` in training, which only the PyTorch path applies): a forced kernel that cannot run is an
    error, "auto" falls back with one warning per reason."""
    if kernel == "torch":
        return False
    reason = kernel_unavailable_reason(q)
    if dropout and reason is None:
        reason = f"it has no attention dropout (training with p = {dropout}; set the attention dropout to 0 to use it)"
    if kernel == "triton":
        if reason is not None:
            raise RuntimeError(f"sea_kernel='triton' was requested, but {reason}. Use sea_kernel='auto' or 'torch'.")
        return True
    if not q.is_cuda:
        return False
    if reason is not None:
        logger.warning_once(f"SEA: the Triton kernel cannot run ({reason}); using the slower PyTorch path.")
        return False
    return True


def sparse_attention_triton(q, k, v, selection: SeaSelection, scaling: float, need_probs: bool = True,
                            inference: bool = False):
    """`sea_attention.sparse_attention` by the Triton kernel that fits the selection: (probabilities (N, H, T, S)
    or None when not `need_probs`, context (N, H, T, D)). k and v may have fewer heads than q (grouped-query
    attention); they are read in place, never repeated. Per-query rows wanting neither probabilities nor a gradient
    (at `inference`, or when no input requires one) take the split kernel."""
    if selection.rows_per_block > 1:
        return block_sparse_attention(q, k, v, selection, scaling, need_probs)
    differentiable = not inference and any(x.requires_grad for x in (q, k, v))
    if not need_probs and not differentiable:
        return None, per_query_inference_attention(q, k, v, selection, scaling)
    return per_query_sparse_attention(q, k, v, selection, scaling, need_probs)


def sparse_attention_implementation(q: torch.Tensor, kernel: str):
    """`sparse_attention` or `sparse_attention_triton`, whichever serves these queries under `sea_kernel` (for
    passes that want probabilities and no gradient, such as re-ranking candidates)."""
    return sparse_attention_triton if sparse_kernel_serves(q, kernel) else sparse_attention


def gated_sparse_attention(q, k, v, selection: SeaSelection, scaling: float, gate, need_probs: bool, kernel: str,
                           inference: bool, dropout: float):
    """The sparse attention over `selection`, scaled and offset by the output `gate` (scale, offset) (None: no
    gates): the gate-scaled probabilities (None without `need_probs`) and the context, with `dropout` applied to
    the probabilities that weight the context."""
    if not sparse_kernel_serves(q, kernel, dropout):
        probs, context = sparse_attention(q, k, v, selection, scaling, need_probs, dropout)
    elif gate is not None and selection.rows_per_block > 1 and not need_probs and inference:
        # The kernel applies the gate as it writes, into the offset's memory (no other buffer of the output's size).
        scale, offset = gate
        return None, gated_block_attention(q, k, v, selection, scaling, scale.float().contiguous(),
                                           offset.to(q.dtype).contiguous())
    else:
        probs, context = sparse_attention_triton(q, k, v, selection, scaling, need_probs, inference)
    return gated(probs, context, gate)


def estimate_encoding(q, k_new, v_new, code, new_valid, counts, sums, rows, weights: EstimatorWeights, causal: bool,
                      with_kernel_context: bool, kernel: str, inference: bool):
    """`sea_attention.kernel_encoding` (same arguments and result) by the implementation that serves this call:
    causal inference runs the estimate kernels on CUDA, or wherever `sea_kernel` forces them, when they can; a
    long causal input at inference otherwise runs the PyTorch reference in passes of `ESTIMATE_ROWS_PER_PASS`
    rows (bounded memory, the same result); everything else runs it in one pass."""
    if causal and inference and kernel != "torch" and not with_kernel_context and (q.is_cuda or kernel == "triton"):
        d = v_new.shape[-1]
        reason = estimate_kernel_unavailable_reason(q, d)
        if reason is None:
            try:
                encoding, new_sums, gate = causal_kernel_encoding_triton(
                    q, k_new, v_new, code, new_valid, counts, weights, FEATURE_EPS[True], *sums, rows,
                    fused=d == FUSED_ESTIMATE_HEAD_DIM,
                )
                return encoding, new_sums, None, gate
            except OutOfResources:  # e.g. GPUs with ~100 KB of shared memory per block
                reason = "they need more shared memory than this GPU has"
        logger.warning_once(f"SEA: the estimate kernels cannot run ({reason}); the estimate uses the slower "
                            "PyTorch path.")
    if causal and inference and q.shape[2] > ESTIMATE_ROWS_PER_PASS:
        return kernel_encoding_in_passes(q, k_new, v_new, code, new_valid, counts, sums, rows, weights,
                                         with_kernel_context, ESTIMATE_ROWS_PER_PASS)
    return kernel_encoding(q, k_new, v_new, code, new_valid, counts, sums, rows, weights, causal, with_kernel_context)
