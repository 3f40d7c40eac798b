"""The Triton kernels against the PyTorch reference path they accelerate: forward, gradients (of the context and
of the returned probabilities), half precision, the model-level switch and its errors. On a CPU machine the
kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import CAUSAL, assert_same_layer_outputs, layer_in_two_calls, sea_test_config, tiny_opt_config
from sea.configuration_sea import SEA_FAMILIES
from sea.modeling_sea import CACHE_NAME, converted_class
from sea.sea_attention import (
    FEATURE_EPS,
    SeaSelection,
    kernel_encoding,
    positional_code,
    sparse_attention,
    visible_key_counts,
)
from sea.sea_dispatch import (
    estimate_encoding,
    kernel_unavailable_reason,
    logger,
    sparse_attention_triton,
    sparse_kernel_serves,
)
from sea.sea_layer import SeaAttention

# The kernel modules import Triton: without it they fail to import, and these tests are skipped.
sea_estimate_kernels = pytest.importorskip("sea.sea_estimate_kernels")
sea_sparse_kernels = pytest.importorskip("sea.sea_sparse_kernels")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_problem(n=2, h=3, t=41, d=16, rows_per_block=1, dtype=torch.float32, kv_heads=None, padded=True,
                   heads_per_selection=1):
    """Queries over 30 more keys than queries (as after a cache), a random rank -> position map, random row counts,
    and per block of rows 4 random rank ranges, some empty: of up to 70 keys for blocks (more than one key tile of
    the block kernel), of up to 6 for single queries (the per-slot kernel walks slots one by one); the last query
    head's block 1 has no key at all. Not `padded`: every key valid, ranks are positions. `heads_per_selection`
    consecutive query heads share their ranges."""
    keys = t + 30
    longest = 70 if rows_per_block > 1 else 6
    q = torch.randn(n, h, t, d, device=DEVICE).to(dtype).requires_grad_()
    k, v = (torch.randn(n, kv_heads or h, keys, d, device=DEVICE).to(dtype).requires_grad_() for _ in range(2))
    shape = (n, h // heads_per_selection, -(-t // rows_per_block), 4)
    lengths = torch.randint(0, longest + 1, shape, device=DEVICE) * (torch.rand(shape, device=DEVICE) > 0.2)
    starts = (torch.rand(shape, device=DEVICE) * (keys - lengths + 1)).long()
    lengths[0, -1, 1] = 0
    positions = torch.stack([torch.randperm(keys, device=DEVICE) for _ in range(n)]) if padded else None
    counts = torch.randint(0, keys + 1, (n, t), device=DEVICE)
    return q, k, v, SeaSelection(starts, lengths, positions, counts, rows_per_block,
                                 heads_per_selection=heads_per_selection)


def per_head(selection: SeaSelection) -> SeaSelection:
    """`selection` with every query head's ranges its own copy: what a shared selection must read like."""
    shared = selection.heads_per_selection
    return SeaSelection(selection.starts.repeat_interleave(shared, 1), selection.lengths.repeat_interleave(shared, 1),
                        selection.key_positions, selection.row_counts, selection.rows_per_block)


@pytest.mark.parametrize("rows_per_block, d, padded", [(1, 16, True), (16, 16, True), (32, 24, False)],
                         ids=["per-query", "blocks-16", "blocks-32-d24-no-padding"])
@pytest.mark.parametrize("kv_heads, shared", [(3, 1), (1, 1), (1, 3)],
                         ids=["multi-head", "grouped-query", "grouped-query-shared-selection"])
def test_forward_and_gradients_match_the_float64_reference_path(kv_heads, shared, rows_per_block, d, padded):
    q, k, v, selection = random_problem(h=3, d=d, kv_heads=kv_heads, rows_per_block=rows_per_block, padded=padded,
                                        heads_per_selection=shared)
    scaling = q.shape[-1] ** -0.5
    probs, context = sparse_attention_triton(q, k, v, selection, scaling)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    # Grouped-query keys/values are repeated for the reference only (multi-head attention over copies), and a
    # shared selection is copied to every head.
    repeat = lambda x: x.repeat_interleave(3 // kv_heads, dim=1)
    ref_probs, ref_context = sparse_attention(q64, repeat(k64), repeat(v64), per_head(selection), scaling)
    torch.testing.assert_close(probs.double(), ref_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(context.double(), ref_context, rtol=1e-5, atol=1e-6)
    empty = slice(rows_per_block, 2 * rows_per_block)  # the rows of block 1, which has no key in the last head
    assert torch.all(context[0, -1, empty] == 0) and torch.all(probs[0, -1, empty] == 0)

    grad_probs, grad_context = torch.randn_like(ref_probs), torch.randn_like(ref_context)
    got = torch.autograd.grad((probs * grad_probs.float()).sum() + (context * grad_context.float()).sum(), (q, k, v))
    want = torch.autograd.grad((ref_probs * grad_probs).sum() + (ref_context * grad_context).sum(), (q64, k64, v64),
                               retain_graph=True)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=f"grad {name}")

    # Without probabilities the context and its gradients are the same.
    no_probs, context_only = sparse_attention_triton(q, k, v, selection, scaling, need_probs=False)
    assert no_probs is None
    torch.testing.assert_close(context_only, context)
    got = torch.autograd.grad((context_only * grad_context.float()).sum(), (q, k, v))
    want = torch.autograd.grad((ref_context * grad_context).sum(), (q64, k64, v64))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=f"grad {name} without probabilities")


@pytest.mark.parametrize("rows_per_block, shared", [(1, 1), (1, 3), (16, 1)],
                         ids=["per-query", "per-query-shared-selection", "blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_one_percent_of_float32(dtype, rows_per_block, shared):
    q, k, v, selection = random_problem(dtype=dtype, rows_per_block=rows_per_block, kv_heads=3 // shared,
                                        heads_per_selection=shared)
    scaling = q.shape[-1] ** -0.5
    probs, context = sparse_attention_triton(q, k, v, selection, scaling)
    assert probs.dtype == dtype and context.dtype == dtype
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref_probs, ref_context = sparse_attention(q32, k32, v32, selection, scaling)
    relative = lambda a, b: float((a.detach().float() - b.detach()).norm() / b.detach().norm())
    assert relative(context, ref_context) <= 1e-2 and relative(probs, ref_probs) <= 1e-2
    with torch.no_grad():  # inference: the split kernel for single queries, matrix products in half precision
        _, inference_context = sparse_attention_triton(q, k, v, selection, scaling, need_probs=False)
    assert relative(inference_context, ref_context) <= 1e-2
    grad = torch.randn_like(ref_context)
    got = torch.autograd.grad((context.float() * grad).sum(), (q, k, v))
    want = torch.autograd.grad((ref_context * grad).sum(), (q32, k32, v32))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and relative(a, b) <= 1e-2


class OperationRecorder(TorchDispatchMode):
    """The names of the PyTorch operations run inside it (the Triton kernels are none of them)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("d, heads, kv_heads, dtype", [
    (64, 3, 3, torch.float32), (64, 4, 2, torch.float32), (64, 3, 3, torch.bfloat16), (64, 4, 2, torch.bfloat16),
    (128, 4, 2, torch.bfloat16),  # float32 at head_dim 128 has no estimate kernel (estimate_kernel_unavailable_reason)
], ids=["multi-head", "grouped-query", "multi-head-bf16", "grouped-query-bf16", "d128-grouped-query-bf16"])
@pytest.mark.parametrize("one_segment", [False, True], ids=["segment-per-chunk", "one-segment-per-pass"])
def test_causal_estimate_kernel_matches_the_pytorch_path(d, heads, kv_heads, dtype, one_segment, monkeypatch):
    """The estimate kernels against the reference `kernel_encoding` (head_dim 64: the fused
    kernel-attention + encoder + gate kernels; 128: the column-split kernel attention, then the encoder kernel): a
    padded batch continued from random carried sums over three chunks of rows, cut into one segment per chunk (the
    sums carried from segment to segment) or into one segment (carried from chunk to chunk inside a program; at
    head_dim 128 in two passes of rows, 128 + 22, that carry the sums from pass to pass); the encoding of a random
    subset of rows, the output gate of every row and the new sums; with gradients wanted, the dispatcher takes
    the differentiable PyTorch path."""
    if one_segment:  # a grid of one program per head (and column block): one segment
        monkeypatch.setattr(sea_estimate_kernels, "ESTIMATE_PROGRAMS", 1)
        monkeypatch.setattr(sea_estimate_kernels, "ESTIMATE_ROWS_PER_PASS", 128)

    config = tiny_opt_config(sea_key_budget=8, sea_compressed_width=8)
    op = SeaAttention(config, heads, d, True, kv_heads)
    op.init_sea_weights()
    with torch.no_grad():
        for param in (*op.encoder.parameters(), *op.gates.parameters()):
            param.normal_(std=0.3)
    op = op.to(DEVICE, dtype)
    n, t = 2, 150
    q = torch.randn(n, heads, t, d, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(n, kv_heads, t, d, device=DEVICE, dtype=dtype) for _ in range(2))
    valid = torch.ones(n, t, dtype=torch.bool, device=DEVICE)
    valid[1, : torch.randint(1, t // 2, ()).item()] = False
    state = op.initial_state(n, dtype, DEVICE)
    state.kv_sum.uniform_(0, 5)
    state.k_sum.uniform_(0, 5)
    state.value_sum.normal_(std=5)
    # As after a cached prefix of 7 valid tokens: counts include the earlier keys.
    counts = visible_key_counts(torch.cat([torch.ones(n, 7, dtype=torch.bool, device=DEVICE), valid], 1), True, valid)
    code = positional_code(valid, counts, d, True).to(dtype)
    rows = torch.randperm(t, device=DEVICE)[:40].sort().values
    sums, weights = (state.kv_sum, state.k_sum, state.value_sum), op.estimator_weights
    with torch.no_grad():
        want, want_sums, _, want_gate = kernel_encoding(q, k, v, code, valid, counts, sums, rows, weights, True, False)
        with OperationRecorder() as fused:
            got, got_sums, got_gate = sea_estimate_kernels.causal_kernel_encoding_triton(
                q, k, v, code, valid, counts, weights, FEATURE_EPS[True], *sums, rows, fused=d == 64)
    assert "tril" not in fused.names, "the PyTorch kernel attention ran, not the fused kernels"
    assert got.shape == (n, heads, 40, 2 * d)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0.05)
    torch.testing.assert_close(got, want, **tolerance)
    for a, b in zip(got_gate, want_gate):  # scale, offset
        torch.testing.assert_close(a, b.to(a.dtype), **tolerance)
    for a, b in zip(got_sums, want_sums):
        if dtype == torch.float32 or DEVICE == "cpu":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        else:  # half-precision inputs take one TF32 pass on a GPU: ~2^-11 relative error per product
            assert (a - b).norm() / b.norm() < 2e-3
    if dtype == torch.bfloat16:
        assert (got.float() - want.float()).norm() / want.float().norm() < 1e-2
    # With gradients wanted, the differentiable PyTorch path serves.
    with OperationRecorder() as differentiable:
        estimate_encoding(q, k, v, code, valid, counts, sums, None, weights, True, False, "triton", inference=False)
    assert "tril" in differentiable.names


@pytest.mark.parametrize("gates", [True, False], ids=["gates", "no-gates"])
def test_inference_forward_with_the_estimate_kernels_equals_the_pytorch_path(gates):
    """A whole causal layer at inference, kernels (estimate, gates, sparse attention) against the PyTorch path: a
    padded, grouped-query batch in query blocks, continued from an earlier call; the same keys, context and
    carried state. (Head size 128, which float32 estimates in PyTorch: the bfloat16 test below.)"""
    torch.manual_seed(0)
    d = 64
    config = tiny_opt_config(sea_key_budget=24, sea_compressed_width=8, sea_query_block_size=16,
                             sea_output_gates=gates, sea_bin_ranking="estimate", sea_candidate_factor=1)
    op = SeaAttention(config, 4, d, True, 2)
    op.init_sea_weights()
    if gates:
        with torch.no_grad():
            for param in op.gates.parameters():
                param.normal_(std=0.5)
    op = op.to(DEVICE)
    n, first, t = 2, 37, 120
    q = torch.randn(n, 4, t, d, device=DEVICE)
    k, v = (torch.randn(n, 2, t, d, device=DEVICE) for _ in range(2))
    valid = torch.ones(n, t, dtype=torch.bool, device=DEVICE)
    valid[1, :9] = False
    results = {}
    for kernel in ("torch", "triton"):
        op.config.sea_kernel = kernel
        results[kernel] = layer_in_two_calls(op, q, k, v, valid, first, d**-0.5, need_probs=False)
    assert_same_layer_outputs(results["triton"], results["torch"], dict(rtol=1e-4, atol=1e-5), dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("block, d", [(1, 64), (16, 64), (16, 128)], ids=["per-query", "blocks", "d128-blocks"])
def test_half_precision_inference_with_the_estimate_kernels_keeps_the_dtype(block, d):
    """bfloat16 at inference, estimate kernels and gates (the kernel's float32 gate scale must not promote the
    output), close to the PyTorch path in bfloat16 and one new token continued from the state."""
    torch.manual_seed(0)
    config = tiny_opt_config(sea_key_budget=24, sea_compressed_width=8, sea_query_block_size=block,
                             sea_bin_ranking="estimate", sea_candidate_factor=1)
    op = SeaAttention(config, 2, d, True)
    op.init_sea_weights()
    with torch.no_grad():
        op.gates.weight.normal_(std=0.5)
    op = op.to(DEVICE, torch.bfloat16)
    q, k, v = (torch.randn(1, 2, 50, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    valid = torch.ones(1, 50, dtype=torch.bool, device=DEVICE)
    results = {}
    for kernel in ("torch", "triton"):
        op.config.sea_kernel = kernel
        with OperationRecorder() as recorded:
            results[kernel] = layer_in_two_calls(op, q, k, v, valid, 49, d**-0.5, need_probs=False)
        assert ("tril" in recorded.names) == (kernel == "torch"), "the estimate did not run where it should"
    for got, want in zip(results["triton"], results["torch"]):
        assert got.context.dtype == torch.bfloat16
        assert (got.context.float() - want.context.float()).norm() / want.context.float().norm() < 2e-2


@pytest.mark.parametrize("d, reason", [(16, "head_dim 16 is not 64 or 128"), (128, "float32 at head_dim 128")],
                         ids=["head_dim-16", "float32-head_dim-128"])
def test_estimate_kernel_on_an_unsupported_head_size_warns_once_and_uses_the_pytorch_path(d, reason):
    from transformers.testing_utils import CaptureLogger

    op = SeaAttention(tiny_opt_config(sea_key_budget=8, sea_compressed_width=8, sea_kernel="triton"), 2, d, True)
    op.init_sea_weights()
    q, k, v = (torch.randn(1, 2, 20, d, device=DEVICE) for _ in range(3))
    with torch.no_grad(), CaptureLogger(logger) as captured:
        first = op.to(DEVICE)(q, k, v, None, d**-0.5, need_probs=False)
        op(q, k, v, None, d**-0.5, need_probs=False)
    assert captured.out.count(reason) == 1
    op.config.sea_kernel = "torch"
    with torch.no_grad():
        torch.testing.assert_close(first.context, op(q, k, v, None, d**-0.5, need_probs=False).context)

@pytest.mark.parametrize("kv_heads", [3, 1], ids=["multi-head", "grouped-query"])
@pytest.mark.parametrize("rows_per_block", [1, 16], ids=["per-query", "blocks"])
def test_keys_and_values_in_a_larger_buffer_are_read_in_place(rows_per_block, kv_heads):
    """A cache hands out its keys and values as views of larger buffers (room for later tokens): the kernels read
    them in place, with the same results and gradients as from contiguous copies."""
    q, k, v, selection = random_problem(rows_per_block=rows_per_block, kv_heads=kv_heads)
    n, kv_heads, keys, d = k.shape
    buffers = [torch.randn(n, kv_heads, keys + 37, d, device=DEVICE) for _ in range(2)]
    k_view, v_view = (buffer[:, :, :keys].copy_(x.detach()).requires_grad_() for buffer, x in zip(buffers, (k, v)))
    assert not k_view.is_contiguous()
    assert all(a is b for a, b in zip(sea_sparse_kernels._read_in_place(k_view, v_view), (k_view, v_view)))
    scaling = d**-0.5
    probs, context = sparse_attention_triton(q, k_view, v_view, selection, scaling)
    ref_probs, ref_context = sparse_attention_triton(q, k, v, selection, scaling)
    torch.testing.assert_close(context, ref_context, rtol=0, atol=0)
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=0)
    grad = torch.randn_like(context)
    got = torch.autograd.grad((context * grad).sum(), (q, k_view, v_view))
    want = torch.autograd.grad((ref_context * grad).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("rows_per_block, need_probs", [(1, True), (1, False), (16, True)],
                         ids=["per-query", "decode", "blocks"])
def test_offsets_past_two_to_the_31_elements(rows_per_block, need_probs):
    """Keys ranked past 2^31 / head_dim: their element offsets overflow int32. The key tensor (also the values:
    4.3 GB of bf16) is allocated but only its tail written, so the memory is never touched elsewhere; the kernels
    read the ranges near its end as the PyTorch path does on that tail cut out."""
    t, d, tail = 32, 64, 300
    keys = 2**31 // d + tail
    q = torch.randn(1, 1, t, d, device=DEVICE, dtype=torch.bfloat16)
    k = torch.empty(1, 1, keys, d, device=DEVICE, dtype=torch.bfloat16)
    k[:, :, keys - tail:].normal_()
    blocks = t // rows_per_block
    lengths = torch.randint(1, 60, (1, 1, blocks, 4), device=DEVICE)
    starts = keys - tail + (torch.rand(1, 1, blocks, 4, device=DEVICE) * (tail - lengths)).long()
    counts = torch.full((1, t), keys, device=DEVICE)
    with torch.no_grad():
        probs, context = sparse_attention_triton(q, k, k, SeaSelection(starts, lengths, None, counts, rows_per_block),
                                                 0.125, need_probs)
    k_tail = k[:, :, keys - tail:].float()
    cut = SeaSelection(starts - (keys - tail), lengths, None, torch.full_like(counts, tail), rows_per_block)
    ref_probs, ref_context = sparse_attention(q.float(), k_tail, k_tail, cut, 0.125)
    assert (context.float() - ref_context).norm() / ref_context.norm() < 1e-2
    if need_probs:
        assert (probs.float() - ref_probs).norm() / ref_probs.norm() < 1e-2


@pytest.mark.parametrize("rows, slots", [(1, 1000), (32, 1024), (300, 1024), (8192, 1024), (10**6, 4096), (5, 0)])
def test_split_kernel_shares_cover_every_slot_in_whole_tiles(rows, slots):
    splits, share = sea_sparse_kernels.split_shares(rows, slots)
    tile = sea_sparse_kernels.DECODE_TILE_SLOTS
    assert share % tile == 0 and splits * share >= slots and (splits - 1) * share < max(slots, 1)
    assert share >= min(sea_sparse_kernels.DECODE_SPLIT_SLOTS, slots)  # never shorter than a decode step's shares
    if rows >= sea_sparse_kernels.SPLIT_KERNEL_PROGRAMS:
        assert splits == 1  # a prefill's rows fill the GPU alone


@pytest.mark.parametrize("programs, padded, kv_heads, shared",
                         [(None, True, 3, 1), (None, False, 1, 1), (72, True, 1, 1), (1, False, 3, 1),
                          (None, True, 1, 3), (1, True, 1, 3)],
                         ids=["shares-of-128", "shares-of-128-no-padding-grouped-query", "longer-shares-grouped-query",
                              "one-program-per-row-no-padding", "shares-of-128-shared-selection",
                              "one-program-per-row-shared-selection"])
def test_split_kernel_matches_the_float64_reference_path(kv_heads, padded, programs, shared, monkeypatch):
    """Per-query selections at inference without probabilities take the split kernel: rows of up to ~800 slots
    (several shares: of 128 slots, as a decode step's few rows get, longer ones, or one share per row, as a
    prefill's many rows get), empty ranges, a row with no key at all, rows whose visible count cuts their ranges,
    keys read in place from a larger buffer, and selections that a key/value group's query heads share (each key
    loaded once for all of them)."""
    if programs is not None:
        monkeypatch.setattr(sea_sparse_kernels, "SPLIT_KERNEL_PROGRAMS", programs)
    n, h, t, d, keys = 2, 3, 4, 24, 900
    q = torch.randn(n, h, t, d, device=DEVICE)
    k, v = (torch.randn(n, kv_heads, keys + 50, d, device=DEVICE)[:, :, :keys] for _ in range(2))
    shape = (n, h // shared, t, 5)
    lengths = torch.randint(0, 200, shape, device=DEVICE) * (torch.rand(shape, device=DEVICE) > 0.2)
    starts = (torch.rand(shape, device=DEVICE) * (keys - lengths + 1)).long()
    lengths[1, -1, 3] = 0
    positions = torch.stack([torch.randperm(keys, device=DEVICE) for _ in range(n)]) if padded else None
    counts = torch.randint(keys // 2, keys + 1, (n, t), device=DEVICE)
    selection = SeaSelection(starts, lengths, positions, counts, 1, heads_per_selection=shared)
    scaling = d**-0.5
    with torch.no_grad():
        probs, context = sparse_attention_triton(q, k, v, selection, scaling, need_probs=False)
    splits, _ = sea_sparse_kernels.split_shares(n * h // shared * t, selection.slots)
    shares_of_128 = -(-selection.slots // sea_sparse_kernels.DECODE_SPLIT_SLOTS)
    assert probs is None and selection.slots > 3 * sea_sparse_kernels.DECODE_SPLIT_SLOTS
    assert splits == {None: shares_of_128, 72: 3, 1: 1}[programs]
    repeat = lambda x: x.double().repeat_interleave(h // kv_heads, dim=1)
    _, reference = sparse_attention(q.double(), repeat(k), repeat(v), per_head(selection), scaling)
    torch.testing.assert_close(context.double(), reference, rtol=1e-5, atol=1e-6)
    assert torch.all(context[1, -1, 3] == 0)


# (causal family, query block size, candidate factor, group selection): both selection modes for the tiny OPT and
# Llama (Llama's per-query mode with the exact re-ranking of candidates), one for each of the other families at its
# real small shape, whose interpreted kernels take up to a minute on a CPU per mode (Qwen2's head_dim 64 also takes
# the estimate kernels); the grouped-query families' selections shared by each key/value group in both modes
# (Qwen2: groups of 7 heads).
KERNEL_CASES = [("opt", 1, 1, False), ("opt", 16, 1, False), ("llama", 16, 1, False), ("llama", 1, 2, True),
                ("qwen2", 1, 1, True), ("qwen3", 16, 1, False), ("mistral", 16, 1, True)]


def test_every_causal_family_runs_the_kernels():
    assert {model_type for model_type, *_ in KERNEL_CASES} == set(CAUSAL)


@pytest.mark.parametrize("model_type, block, candidates, group", KERNEL_CASES,
                         ids=[f"{m}-block{b}" + (f"-candidates{c}" if c > 1 else "") + ("-grouped" if g else "")
                              for m, b, c, g in KERNEL_CASES])
def test_model_with_the_kernel_equals_the_pytorch_path(model_type, block, candidates, group):
    torch.manual_seed(0)
    sea = dict(sea_key_budget=8, sea_compressed_width=8, sea_query_block_size=block, sea_candidate_factor=candidates,
               sea_group_selection=group)
    model_class = converted_class(SEA_FAMILIES[model_type])
    reference = model_class(sea_test_config(model_type, **sea, sea_kernel="torch")).to(DEVICE).eval()
    kernel = model_class(sea_test_config(model_type, **sea, sea_kernel="triton")).to(DEVICE).eval()
    kernel.load_state_dict(reference.state_dict())
    ids = torch.randint(3, 120, (2, 24), device=DEVICE)
    mask = torch.ones_like(ids).index_fill_(1, torch.arange(4, device=DEVICE), 0)
    mask[1] = 1
    with torch.no_grad():
        torch.testing.assert_close(kernel(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits,
                                   rtol=1e-4, atol=1e-5)
        # Cached decode steps: from the second on, the kernel reads keys and values from the cache's buffers, which
        # have room for later tokens.
        caches = {}
        for step in range(3):
            step_mask = torch.cat([mask, torch.ones(2, step + 1, dtype=mask.dtype, device=DEVICE)], 1)
            logits = {}
            for name, model in (("kernel", kernel), ("reference", reference)):
                if step == 0:
                    caches[name] = model(ids, attention_mask=mask, use_cache=True)[CACHE_NAME]
                token = ids[:, step : step + 1]
                logits[name] = model(token, attention_mask=step_mask, **{CACHE_NAME: caches[name]}, use_cache=True).logits
            torch.testing.assert_close(logits["kernel"], logits["reference"], rtol=1e-4, atol=1e-5)
        assert not caches["kernel"].layers[0].keys.is_contiguous()


@pytest.mark.skipif(DEVICE != "cuda", reason="generate() compiles on accelerators only; on the CPU, "
                    "test_generation.py traces the same compiled decode step")
def test_generate_compiles_static_decoding_over_the_kernels_and_decodes_as_eager_generation():
    """On CUDA, `generate(cache_implementation="static")` compiles the decode step itself (transformers' default
    compile config: inductor with CUDA graphs) over SEA's Triton kernels, as it does for dense models: one graph
    for every step, and the tokens and logits of eager generation with the growing SeaCache."""
    torch.manual_seed(0)
    config = sea_test_config("llama", sea_key_budget=32, sea_compressed_width=16)
    model = converted_class(SEA_FAMILIES["llama"])(config).to(DEVICE).eval()
    ids = torch.randint(3, 120, (2, 300), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    settings = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                    return_dict_in_generate=True)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        eager = model.generate(ids, **settings)
        compiled = model.generate(ids, cache_implementation="static", **settings)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1, "generate did not compile one graph"
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), rtol=1e-3, atol=1e-4)


def test_forced_kernel_without_a_usable_triton_is_a_clear_error():
    code = (
        "import torch\nfrom sea.modeling_sea import SeaOptForCausalLM\nfrom sea.configuration_sea import SeaOptConfig\n"
        "config = SeaOptConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, ffn_dim=64, vocab_size=50,"
        " word_embed_proj_dim=32, sea_key_budget=4, sea_compressed_width=8, sea_kernel='triton')\n"
        "SeaOptForCausalLM(config)(torch.randint(0, 50, (1, 9)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the kernel can run")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "sea_kernel='triton' was requested" in out.stderr and "not on a CUDA device" in out.stderr


def test_attention_dropout_in_training_takes_the_pytorch_path_or_refuses_a_forced_kernel():
    """The kernels have no attention dropout: in training with dropout, `auto` uses the PyTorch path (its
    probabilities dropped) and a forced kernel is a clear error."""
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    assert not sparse_kernel_serves(q, "auto", dropout=0.1)
    with pytest.raises(RuntimeError, match="no attention dropout.*set the attention dropout to 0"):
        sparse_kernel_serves(q, "triton", dropout=0.1)
    assert sparse_kernel_serves(q, "triton")


def test_batch_times_heads_past_the_grid_limit_takes_the_pytorch_path():
    """The sparse kernels launch one grid row per (batch, head): past CUDA's 65535 the reason says so (the layer
    then takes the PyTorch path with one warning, as for every reason) instead of failing to launch."""
    assert kernel_unavailable_reason(torch.empty(4095, 16, 1, 8, device=DEVICE)) is None
    assert "65536 exceeds 65535" in kernel_unavailable_reason(torch.empty(4096, 16, 1, 8, device=DEVICE))
