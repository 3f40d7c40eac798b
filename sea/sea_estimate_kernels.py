"""Triton kernels of the causal estimate, for inference: `sea_attention.kernel_encoding`'s kernel features, causal
kernel attention from carried sums, the encoder, and the output gate (`sea_attention.output_gate`, with the
running mean of the values), fused so that neither the features, the estimate nor the encoding of rows the CNN
does not read reach memory (the decoder, CNN and selection stay in PyTorch: at inference they run on a few rows
per query block only). Tested against `sea_attention.kernel_encoding`; only `sea_dispatch` imports this module.
"""

import torch
import torch.nn.functional as F

try:  # the one guarded import: the Hub loader's import check skips try blocks, so a bundle without Triton loads
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources  # noqa: F401 (re-exported: `sea_dispatch` catches it)
except ImportError as error:  # `sea_dispatch` catches this and runs the PyTorch path
    raise ImportError("SEA's Triton kernels need Triton (pip install triton)") from error

from .sea_attention import ESTIMATE_ROWS_PER_PASS, LINEAR_ATTENTION_CHUNK, EstimatorWeights
from .sea_sparse_kernels import dot_arguments, kernel_for_device, key_value_head

# Rows per step of the kernels' walk: LINEAR_ATTENTION_CHUNK, as in the PyTorch path. The column-split kernels
# write their (N, H, rows, 2D) estimate for ESTIMATE_ROWS_PER_PASS rows at a time, reusing the buffer.
ESTIMATE_PROGRAMS = 512  # rows are cut into segments until (batch x head, segment) programs fill a large GPU
FUSED_ESTIMATE_HEAD_DIM = 64  # one program holds a head's (F, 2D) sums and the encoder's weights only up to here
ESTIMATE_TILE = 64  # columns of [code || v] per program of the segment sums and of the column-split estimate


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
    scale, eps = tl.cast(scale, tl.float32), tl.cast(eps, tl.float32)  # inductor passes Python floats as float64
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
    kv_head = key_value_head(head, num_heads, group)
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
    """`sea_attention.output_gate` of a chunk of rows: the scale 2 sigmoid(g_0) and the offset tanh(g_1) times
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
    norm_eps = tl.cast(norm_eps, tl.float32)  # inductor passes Python floats as float64
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
    kv_head = key_value_head(head, num_heads, group)
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
    kv_head = key_value_head(head, num_heads, group)
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
    segments = max(1, min(triton.cdiv(t, LINEAR_ATTENTION_CHUNK), triton.cdiv(ESTIMATE_PROGRAMS, programs_per_segment)))
    segment_rows = LINEAR_ATTENTION_CHUNK * max(1, triton.cdiv(t, LINEAR_ATTENTION_CHUNK * segments))
    return max(1, triton.cdiv(t, segment_rows)), segment_rows


def _segment_start_sums(k, v, code, key_valid, projection, eps, record, block_f: int, first: int, last: int,
                        segments: int, segment_rows: int):
    """The packed sums (`_pack_sums`) before each segment of rows first .. last - 1, (N x H_kv, segments, record),
    and after row last - 1, (N x H_kv, record): `_causal_kernel_sums` sums each segment, a prefix over segments
    adds them to `record`, the packed sums before row `first`."""
    n, kv_heads, t, d = k.shape
    tile = min(ESTIMATE_TILE, d)
    kernel, arguments = kernel_for_device(
        _causal_kernel_sums, _estimate_sums_tuned, k.is_cuda,
        dict(HEAD_DIM=d, BLOCK_F=block_f, TILE=tile, CHUNK=LINEAR_ATTENTION_CHUNK,
             SUMS_PRECISION=_estimate_precision(k)))
    segment_sums = record.new_empty(n * kv_heads, segments, record.shape[-1])
    kernel[(n * kv_heads, segments, 2 * d // tile)](
        k, v, code, key_valid, projection, segment_sums, t, first, last, segment_rows, segments, projection.shape[0],
        kv_heads, d**-0.25, eps, **arguments,
    )
    start = record.unsqueeze(1) + segment_sums.cumsum(1) - segment_sums
    return start, record + segment_sums.sum(1)


def causal_kernel_encoding_triton(q, k, v, code, key_valid, counts, weights: EstimatorWeights, eps: float, kv_sum,
                                  k_sum, value_sum, rows, fused: bool):
    """The causal `sea_attention.kernel_encoding` as Triton kernels, for inference: the encoding (N, H, R, 2D) of
    [kernel attention of [code || v] || v] at `rows` (R of the T rows; None: all), the new sums (kv_sum, k_sum,
    value_sum) after these rows, and with the weights' gates (else None) the output gate of every row
    (`sea_attention.output_gate`): scale (N, H, T, 1) and offset (N, H, T, D).

    q (N, H, T, D), k and v (N, H_kv, T, D) of the new rows, code (N, T, D), key_valid (N, T), the visible-key
    counts (N, T) and the sums before these rows (N, H_kv, F, 2D), (N, H_kv, F), (N, H_kv, D). Rows are cut into
    segments: a first kernel sums phi(k) [code || v]^T, phi(k) and the valid v per segment, and a prefix over
    segments gives each segment's starting sums. `fused` (head_dim 64): a second kernel then walks each segment in chunks,
    carrying the sums in registers, and encodes and gates every row as soon as it is estimated: neither the
    features, the estimate nor the encoding of other rows reach memory. Otherwise (larger heads, whose sums and
    encoder weights outgrow one program) programs split the estimate by 64 columns of [code || v] (each recomputing its
    rows' features), write it for a pass of `ESTIMATE_ROWS_PER_PASS` rows, and a third kernel encodes and gates the
    pass. Raises Triton's OutOfResources when the kernels need more shared memory than this GPU has."""
    n, h, t, d = q.shape
    kv_heads, f = k.shape[1], weights.feature_projection.shape[0]
    block_f = max(16, triton.next_power_of_2(f))
    q, k, v, code, key_valid, counts, projection = (
        x.contiguous() for x in (q, k, v, code, key_valid, counts, weights.feature_projection))
    gated = weights.gate_weight is not None
    # Where each row's encoding goes: its index among `rows`, or -1 when it is not wanted.
    if rows is None:
        row_slot = torch.arange(t, dtype=torch.int32, device=q.device)
    else:
        row_slot = torch.full((t,), -1, dtype=torch.int32, device=q.device)
        row_slot[rows] = torch.arange(rows.shape[0], dtype=torch.int32, device=q.device)
    encoding = torch.empty(n, h, t if rows is None else rows.shape[0], 2 * d, dtype=v.dtype, device=q.device)
    if gated:
        scale = torch.empty(n, h, t, 1, dtype=torch.float32, device=q.device)
        offset = torch.empty(n, h, t, d, dtype=v.dtype, device=q.device)
        gate_weight, gate_bias = weights.gate_weight.contiguous(), weights.gate_bias
    else:  # never read: the kernels write no gate
        scale = offset = gate_weight = gate_bias = encoding
    encoder_arguments = (weights.encoder_weight.contiguous(), weights.encoder_bias, weights.norm_weight,
                         weights.norm_bias, gate_weight, gate_bias, row_slot, encoding, scale, offset)
    estimate_precision = _estimate_precision(q)
    encoding_constants = dict(HEAD_DIM=d, BLOCK_F=block_f, CHUNK=LINEAR_ATTENTION_CHUNK, HAS_GATES=gated,
                              DOT_DTYPE=dot_arguments(v)["DOT_DTYPE"], PRECISION=estimate_precision)
    record = _pack_sums(kv_sum, k_sum, value_sum, block_f)  # (N x H_kv, record): the sums before the next row
    if fused:
        segments, segment_rows = _estimate_segments(t, n * h)
        start, record = _segment_start_sums(k, v, code, key_valid, projection, eps, record, block_f, 0, t, segments,
                                            segment_rows)
        kernel, arguments = kernel_for_device(
            _causal_kernel_encoding, _estimate_encoding_tuned, q.is_cuda,
            dict(encoding_constants, SUMS_PRECISION=estimate_precision))
        kernel[(n * h, segments)](
            q, k, v, code, key_valid, counts, projection, start, *encoder_arguments, t, encoding.shape[2],
            segment_rows, segments, f, h, h // kv_heads, d**-0.25, eps, weights.norm_eps, **arguments,
        )
    else:
        tile = min(ESTIMATE_TILE, d)
        estimate_kernel, estimate_arguments = kernel_for_device(
            _causal_kernel_estimate, _estimate_columns_tuned, q.is_cuda,
            dict(HEAD_DIM=d, BLOCK_F=block_f, TILE=tile, CHUNK=LINEAR_ATTENTION_CHUNK, SUMS_PRECISION=estimate_precision))
        encoder_kernel, encoder_arguments_tuned = kernel_for_device(
            _causal_estimate_encoding, _estimate_encoder_tuned, q.is_cuda, encoding_constants)
        estimate = torch.empty(n * h * min(t, ESTIMATE_ROWS_PER_PASS) * 2 * d, dtype=v.dtype, device=q.device)
        for first in range(0, t, ESTIMATE_ROWS_PER_PASS):
            last = min(t, first + ESTIMATE_ROWS_PER_PASS)
            segments, segment_rows = _estimate_segments(last - first, n * h * 2 * d // tile)
            start, record = _segment_start_sums(k, v, code, key_valid, projection, eps, record, block_f, first, last,
                                                segments, segment_rows)
            estimate_kernel[(n * h, segments, 2 * d // tile)](
                q, k, v, code, key_valid, projection, start, estimate, t, first, last, segment_rows, segments, f, h,
                h // kv_heads, d**-0.25, eps, **estimate_arguments,
            )
            encoder_kernel[(n * h, segments)](
                estimate, v, key_valid, counts, start, *encoder_arguments, t, first, last, encoding.shape[2],
                segment_rows, segments, h, h // kv_heads, weights.norm_eps, **encoder_arguments_tuned,
            )
    kv_part, k_part, v_part = record.view(n, kv_heads, -1).split([2 * block_f * d, block_f, d], dim=-1)
    sums = (kv_part.unflatten(-1, (block_f, 2 * d))[:, :, :f], k_part[..., :f], v_part)
    return encoding, sums, ((scale, offset) if gated else None)