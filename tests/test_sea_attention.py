"""The SEA operator against independent dense float64 computations."""

import math

import pytest
import torch

from conftest import assert_same_layer_outputs, layer_in_two_calls
from sea import sea_attention, sea_dispatch
from sea.configuration_sea import SeaBertConfig, SeaOptConfig
from sea.sea_attention import (
    SeaSelection,
    kernel_features,
    linear_attention,
    orthogonal_gaussian_features,
    positional_code,
    visible_key_counts,
)
from sea.sea_layer import SeaAttention

N, H, D = 3, 4, 16


def make_operator(causal: bool, budget: int, width: int = 16, rule: str = "constant", dtype=torch.float32, block=1,
                  ranking: str = "estimate", candidates: int = 1):
    """A SEA layer of H heads of D with random gates; it ranks bins by SEA's estimate without re-ranking unless
    `ranking` and `candidates` say otherwise."""
    config_class = SeaOptConfig if causal else SeaBertConfig
    config = config_class(
        hidden_size=H * D, num_attention_heads=H, max_position_embeddings=512,
        sea_key_budget=budget, sea_compressed_width=width, sea_budget_rule=rule, sea_query_block_size=block,
        sea_bin_ranking=ranking, sea_candidate_factor=candidates,
    )
    op = SeaAttention(config, H, D, causal)
    with torch.no_grad():
        op.feature_projection.copy_(orthogonal_gaussian_features(*op.feature_projection.shape))
        op.gates.weight.normal_(std=0.5)
        op.gates.bias.normal_(std=0.5)
    return op.to(dtype)


@pytest.mark.parametrize("head_dim", [16, 15])
def test_causal_positional_code_is_a_sinusoid_of_the_rank_among_valid_tokens(head_dim):
    """Channel pair i of a valid key with r valid keys before it holds sin and cos of r x 10000^(-i / (D / 2)),
    padded keys hold zeros (an odd head size leaves its last channel zero), and the last `num_new` keys get the
    codes they have within the whole sequence."""
    t = int(torch.randint(40, 90, ()))
    valid = random_padding(t)
    code = positional_code(valid, visible_key_counts(valid, True, valid), head_dim, True).double()
    pairs = head_dim // 2
    want = torch.zeros(N, t, head_dim, dtype=torch.float64)
    for row in range(N):
        rank = 0
        for position in range(t):
            if valid[row, position]:
                for i in range(pairs):
                    angle = rank * 10000.0 ** (-i / pairs)
                    want[row, position, 2 * i], want[row, position, 2 * i + 1] = math.sin(angle), math.cos(angle)
                rank += 1
    torch.testing.assert_close(code, want, rtol=0, atol=1e-4)
    new = int(torch.randint(1, t, ()))
    tail = valid[:, -new:]
    torch.testing.assert_close(positional_code(tail, visible_key_counts(valid, True, tail), head_dim, True), code[:, -new:].float())


def random_padding(t: int) -> torch.Tensor:
    """Row 0 unpadded, row 1 left-padded, row 2 right-padded, by random amounts."""
    valid = torch.ones(N, t, dtype=torch.bool)
    valid[1, : torch.randint(1, t // 2, ()).item()] = False
    valid[2, t - torch.randint(1, t // 2, ()).item() :] = False
    return valid


def visibility(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """(N, 1, T, T) which keys each query may see, built densely and independently of the operator."""
    t = valid.shape[-1]
    seen = valid[:, None, None, :].expand(-1, -1, t, -1)
    if causal:
        seen = seen & torch.ones(t, t, dtype=torch.bool).tril()
    return seen


def selected_matrix(selection, t: int) -> torch.Tensor:
    """(N, H, T, T) how many times each key fills a valid slot of each query."""
    counts = torch.zeros(*selection.key_index.shape[:-1], t, dtype=torch.long)
    return counts.scatter_add_(-1, selection.key_index, selection.key_valid.long())


def dense_reference(op, q, k, v, valid, selection, scaling, causal):
    """float64 masked softmax over exactly the selected keys, then the gates and the average context."""
    q, k, v = q.double(), k.double(), v.double()
    n, h, t, d = q.shape
    chosen = selected_matrix(selection, t) > 0
    scores = (q @ k.transpose(-1, -2)) * scaling
    probs = torch.softmax(scores.masked_fill(~chosen, float("-inf")), -1).nan_to_num(0.0)
    sparse = probs @ v
    state = op.initial_state(n, torch.float32, q.device) if causal else None
    counts = visible_key_counts(valid, causal, valid)
    estimate = op.estimate(q.float(), k.float(), v.float(), valid, counts, state, not torch.is_grad_enabled())
    log_probs = estimate.log_probs
    gates = op.gates(estimate.encoding).double()
    scale, mix = 2 * torch.sigmoid(gates[..., :1]), torch.tanh(gates[..., 1:])
    seen = visibility(valid, causal).double()
    if causal:
        average = (seen @ v) / seen.sum(-1, keepdim=True).clamp_min(1)
    else:
        average = torch.zeros(n, h, 1, d, dtype=torch.float64)
        width = log_probs.shape[-1]
        for b in range(n):
            length = int(valid[b].sum())
            values = v[b][:, valid[b]]  # (H, L, D) in order
            starts = [(i * length) // width for i in range(width + 1)]
            q_valid = valid[b]
            mean_estimate = log_probs[b][:, q_valid].double().exp().mean(1)  # (H, M)
            for bin_ in range(width):
                lo, hi = starts[bin_], starts[bin_ + 1]
                if hi > lo:
                    average[b, :, 0] += mean_estimate[:, bin_, None] * values[:, lo:hi].mean(1)
    sees_a_key = seen.sum(-1, keepdim=True) > 0  # rows that see no key at all give zeros
    context = (scale * sparse + mix * average) * sees_a_key
    return context, probs * scale


@pytest.mark.parametrize("block", [1, 16], ids=["per-query", "blocks"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rule,budget", [("constant", 5), ("constant", 200), ("reference", 3)])
def test_operator_matches_float64_dense_reference(causal, rule, budget, block):
    t = 70
    op = make_operator(causal, budget, rule=rule, block=block)
    q, k, v = torch.randn(3, N, H, t, D).unbind(0)
    valid = random_padding(t)
    scaling = D**-0.5
    out = op(q, k, v, valid, scaling)
    times_selected = selected_matrix(out.selection, t)
    assert times_selected.max() <= 1, "a key was selected twice"
    assert not ((times_selected > 0) & ~visibility(valid, causal)).any(), "a padded or future key was selected"
    expected_context, expected_probs = dense_reference(op, q, k, v, valid, out.selection, scaling, causal)
    torch.testing.assert_close(out.context.double(), expected_context, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.dense_probs(t).double(), expected_probs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_constant_budget_caps_keys_and_covers_short_rows(causal):
    t, budget = 300, 24
    op = make_operator(causal, budget, width=16)
    q, k, v = torch.randn(3, N, H, t, D).unbind(0)
    valid = random_padding(t)
    out = op(q, k, v, valid, D**-0.5)
    visible = visibility(valid, causal).sum(-1).expand(N, H, t)
    counts = out.selection.key_valid.sum(-1)
    assert counts.equal(visible.clamp_max(budget)), "every query must read min(visible keys, budget) keys"


@pytest.mark.parametrize("ranking, baseline, candidates, block", [
    ("estimate", None, 1, 1), ("estimate", None, 1, 16), ("estimate", "oracle", 1, 1), ("key_summaries", None, 4, 1),
    ("estimate", "random_mask", 2, 16)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_inputs_within_the_budget_read_every_visible_key_once_unranked(causal, ranking, baseline, candidates, block):
    """When no query can see more keys than the budget, every query reads each of its visible keys exactly once,
    as one rank range (no bin is ranked), whatever the ranking, candidates or query blocks: exact attention, also
    from an inference forward without probabilities (one masked dense attention)."""
    t = 48
    op = make_operator(causal, t + int(torch.randint(0, 8, ())), width=8, block=block, ranking=ranking,
                       candidates=candidates)
    op.config.sea_baseline = baseline
    q, k, v = torch.randn(3, N, H, t, D).unbind(0)
    valid = random_padding(t)
    out = op(q, k, v, valid, D**-0.5)
    assert out.selection.lengths.shape[-1] == 1
    assert torch.equal(selected_matrix(out.selection, t), visibility(valid, causal).long().expand(N, H, t, t))
    expected_context, _ = dense_reference(op, q, k, v, valid, out.selection, D**-0.5, causal)
    torch.testing.assert_close(out.context.double(), expected_context, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        inference = op(q, k, v, valid, D**-0.5, need_probs=False)
    assert inference.sparse_probs is None
    torch.testing.assert_close(inference.context.double(), expected_context, atol=1e-5, rtol=1e-5)


def test_reference_rule_takes_round_budget_m_over_l_whole_bins():
    t, budget, width = 400, 4, 16
    op = make_operator(False, budget, width=width, rule="reference")
    q, k, v = torch.randn(3, 1, H, t, D).unbind(0)
    out = op(q, k, v, None, D**-0.5)
    bins = round(budget * width / t) or 1  # 400 keys in 16 bins of 25: one bin per query and head
    assert out.selection.key_valid.sum(-1).eq(bins * t // width).all()
    chosen = out.selection.key_index.masked_fill(~out.selection.key_valid, -1)
    spans = chosen.amax(-1) - chosen.amin(-1)
    assert spans.eq(t // width - 1).all(), "a whole bin is a contiguous key range"


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_attention_matches_dense_float64(causal):
    t = 150  # several causal blocks plus a ragged one
    projection = orthogonal_gaussian_features(8, D)
    q, k = torch.randn(2, N, H, t, D).unbind(0)
    values = torch.randn(N, H, t, 2 * D)
    valid = random_padding(t)
    phi_q = kernel_features(q, projection, causal, None)
    phi_k = kernel_features(k, projection, causal, valid)
    zeros = (torch.zeros(N, H, 8, 2 * D), torch.zeros(N, H, 8)) if causal else (None, None)
    out, _ = linear_attention(phi_q, phi_k, values, causal, *zeros)
    weights = phi_q.double() @ phi_k.double().transpose(-1, -2)
    if causal:
        weights = weights.tril()
    expected = (weights @ values.double()) / weights.sum(-1, keepdim=True)
    rows = valid[:, None, :, None].expand_as(out) if causal else torch.ones_like(out, dtype=torch.bool)
    rows = rows & (weights.sum(-1, keepdim=True) > 0)
    torch.testing.assert_close(out.double()[rows], expected[rows], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("block, ranking", [(1, "first_row"), (16, "first_row"), (16, "window_max")],
                         ids=["per-query", "blocks", "blocks-window-max"])
def test_causal_estimate_never_reads_later_rows(block, ranking):
    t = 90
    op = make_operator(True, 8, block=block)
    op.config.sea_block_ranking = ranking
    q, k, v = torch.randn(3, 1, H, t, D).unbind(0)
    out = op(q, k, v, None, D**-0.5)
    cut = 41
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, cut:] = torch.randn_like(x[:, :, cut:])
    out2 = op(q2, k2, v2, None, D**-0.5)
    torch.testing.assert_close(out.estimate_log_probs[:, :, :cut], out2.estimate_log_probs[:, :, :cut], atol=1e-5, rtol=0)
    assert out.selection.key_index[:, :, :cut].equal(out2.selection.key_index[:, :, :cut])
    torch.testing.assert_close(out.context[:, :, :cut], out2.context[:, :, :cut], atol=1e-5, rtol=0)


def test_causal_blocks_without_probabilities_estimate_only_the_rows_that_choose_keys():
    """Asked for no probabilities, causal query blocks decode and refine only the rows the first row of every
    block needs: the same estimate there, the same keys, context and carried state as estimating every row,
    over a padded batch continued from an earlier call."""
    block, first, t = 16, 37, 150
    op = make_operator(True, 12, dtype=torch.float64, block=block)
    q, k, v = torch.randn(3, N, H, t, D, dtype=torch.float64).unbind(0)
    valid = random_padding(t)
    every_row = layer_in_two_calls(op, q, k, v, valid, first, D**-0.5, need_probs=True)
    leading_rows = layer_in_two_calls(op, q, k, v, valid, first, D**-0.5, need_probs=False)
    for every, leading in zip(every_row, leading_rows):
        rows = every.estimate_log_probs.shape[2]
        assert leading.estimate_log_probs.shape[2] == -(-rows // block)
        torch.testing.assert_close(leading.estimate_log_probs, every.estimate_log_probs[:, :, ::block], atol=1e-12, rtol=0)
    exact = dict(atol=1e-12, rtol=0)
    assert_same_layer_outputs(leading_rows, every_row, exact, exact)


@pytest.mark.parametrize("shortest, longest", [(1, 10), (11, 40)], ids=["within-cnn-reach", "longer"])
def test_causal_inference_within_the_budget_decodes_only_the_rows_the_next_call_needs(shortest, longest):
    """A causal inference forward whose keys all fit in the budget (no probabilities asked) decodes and refines the
    estimate of its first row and of the rows the CNN's memory needs only: the same estimate there and the same
    carried state as estimating every row, so a padded batch continued past the budget selects the same keys and
    gets the same context."""
    budget = 40
    first = int(torch.randint(shortest, longest + 1, ()))
    t = first + 60
    op = make_operator(True, budget, dtype=torch.float64)
    q, k, v = torch.randn(3, N, H, t, D, dtype=torch.float64).unbind(0)
    valid = random_padding(t)
    with torch.no_grad():
        every_row = layer_in_two_calls(op, q, k, v, valid, first, D**-0.5, need_probs=True)
        needed_rows = layer_in_two_calls(op, q, k, v, valid, first, D**-0.5, need_probs=False)
    assert needed_rows[0].estimate_log_probs.shape[2] == 1
    torch.testing.assert_close(needed_rows[0].estimate_log_probs, every_row[0].estimate_log_probs[:, :, :1], atol=1e-12, rtol=0)
    for name, tensor in vars(every_row[0].state).items():
        torch.testing.assert_close(getattr(needed_rows[0].state, name), tensor, atol=1e-12, rtol=0)
    torch.testing.assert_close(needed_rows[1].estimate_log_probs, every_row[1].estimate_log_probs, atol=1e-10, rtol=0)
    exact = dict(atol=1e-10, rtol=0)
    assert_same_layer_outputs(needed_rows, every_row, exact, exact)


@pytest.mark.parametrize("ranking, candidates", [("key_summaries", 4), ("key_bounds", 1)])
def test_causal_inference_ranked_by_content_decodes_only_the_rows_the_next_call_needs(ranking, candidates):
    """A causal inference forward past the budget whose ranking reads no estimate (a content ranking) decodes the
    estimate of its first row and of the rows the CNN's memory needs only: the same carried state, keys and context
    as estimating every row, over a padded batch continued from an earlier call; an estimate-ranked next call then
    reads the same estimate."""
    first, t = int(torch.randint(5, 40, ())), 110
    op = make_operator(True, 12, dtype=torch.float64, ranking=ranking, candidates=candidates)
    q, k, v = torch.randn(3, N, H, t, D, dtype=torch.float64).unbind(0)
    valid = random_padding(t)
    with torch.no_grad():
        every_row = layer_in_two_calls(op, q, k, v, valid, first, D**-0.5, need_probs=True)
        needed_rows = layer_in_two_calls(op, q, k, v, valid, first, D**-0.5, need_probs=False)
    for every, needed in zip(every_row, needed_rows):
        assert needed.estimate_log_probs.shape[2] == 1
        torch.testing.assert_close(needed.estimate_log_probs, every.estimate_log_probs[:, :, :1], atol=1e-12, rtol=0)
    exact = dict(atol=1e-10, rtol=0)
    assert_same_layer_outputs(needed_rows, every_row, exact, exact)
    op.config.sea_bin_ranking, op.config.sea_candidate_factor = "estimate", 1
    with torch.no_grad():
        after = op(q[:, :, first:], k, v, valid, D**-0.5, state=needed_rows[0].state, need_probs=True)
        want = op(q[:, :, first:], k, v, valid, D**-0.5, state=every_row[0].state, need_probs=True)
    torch.testing.assert_close(after.estimate_log_probs, want.estimate_log_probs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("block", [1, 16], ids=["per-query", "blocks"])
def test_causal_inference_estimates_long_inputs_in_passes(block, monkeypatch):
    """At inference the PyTorch estimate of a long causal input runs in passes of rows carrying the kernel-attention
    sums (bounded memory): the same estimate, keys, context and state as in one pass, over a padded batch continued
    from an earlier call (passes of 32 rows here, so both calls cross several)."""
    first, t = 77, 200
    op = make_operator(True, 12, dtype=torch.float64, block=block)
    q, k, v = torch.randn(3, N, H, t, D, dtype=torch.float64).unbind(0)
    valid = random_padding(t)
    with torch.no_grad():
        one_pass = layer_in_two_calls(op, q, k, v, valid, first, D**-0.5, need_probs=False)
        monkeypatch.setattr(sea_dispatch, "ESTIMATE_ROWS_PER_PASS", 32)
        in_passes = layer_in_two_calls(op, q, k, v, valid, first, D**-0.5, need_probs=False)
    for a, b in zip(in_passes, one_pass):
        torch.testing.assert_close(a.estimate_log_probs, b.estimate_log_probs, atol=1e-10, rtol=0)
    exact = dict(atol=1e-10, rtol=0)
    assert_same_layer_outputs(in_passes, one_pass, exact, exact)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("ranking", [("estimate", 1), ("key_bounds", 3)], ids=["estimate", "bounds-reranked"])
def test_per_query_selection_in_chunks_of_rows_equals_one_pass_over_the_input(causal, ranking, monkeypatch):
    """Per-query selections are made in chunks of rows (bounded memory at a long input): the same ranges and
    context as in one chunk, with SEA's estimate and with candidates re-ranked exactly (chunks of 24 rows here,
    over a padded batch); at inference without probabilities each chunk attends as soon as it is selected."""
    t = 150
    op = make_operator(causal, 12, dtype=torch.float64, ranking=ranking[0], candidates=ranking[1])
    q, k, v = torch.randn(3, N, H, t, D, dtype=torch.float64).unbind(0)
    valid = random_padding(t)
    whole = op(q, k, v, valid, D**-0.5)
    monkeypatch.setattr(sea_attention, "SELECT_CHUNK_ELEMENTS", N * H * op.width * 24)
    chunked = op(q, k, v, valid, D**-0.5)
    assert torch.equal(chunked.selection.starts, whole.selection.starts)
    assert torch.equal(chunked.selection.lengths, whole.selection.lengths)
    assert whole.selection.lengths.sum(-1).max() == 12  # the budget binds: the chunks chose among bins
    torch.testing.assert_close(chunked.context, whole.context, atol=1e-12, rtol=0)
    with torch.no_grad():  # inference without probabilities: each chunk attends once selected, nothing kept
        streamed = op(q, k, v, valid, D**-0.5, need_probs=False)
    assert streamed.selection is None
    torch.testing.assert_close(streamed.context, whole.context, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_query_blocks_share_their_keys(causal):
    """With blocks of 16 queries: a bidirectional block reads one key set; every query of a causal block reads the
    keys its first query reads plus the keys after those up to itself, never more than budget + 15 keys."""
    t, budget, block = 150, 12, 16
    op = make_operator(causal, budget, block=block)
    q, k, v = torch.randn(3, N, H, t, D).unbind(0)
    valid = random_padding(t)
    chosen = selected_matrix(op(q, k, v, valid, D**-0.5).selection, t) > 0
    assert (chosen.sum(-1) <= budget + block - 1).all()
    assert not (chosen & ~visibility(valid, causal)).any()
    for first in range(0, t, block):
        rows = slice(first, min(t, first + block))
        if not causal:
            assert (chosen[:, :, rows] == chosen[:, :, first : first + 1]).all()
            continue
        seen_by_first = visibility(valid, True)[:, :, first]
        for row in range(rows.start, rows.stop):
            after_first = visibility(valid, True)[:, :, row] & ~seen_by_first
            assert (chosen[:, :, row] == (chosen[:, :, first] | after_first)).all()


@pytest.mark.parametrize("causal", [True, False])
def test_padded_rows_are_finite_and_padding_matches_alone_with_selection_held(causal):
    t, pad = 60, 13
    op = make_operator(causal, 6)
    q, k, v = torch.randn(3, 1, H, t, D).unbind(0)
    alone = op(q, k, v, None, D**-0.5)
    for left in (True, False):
        def padded(x):
            filler = torch.randn(1, H, pad, D)
            return torch.cat([filler, x] if left else [x, filler], dim=2)
        valid = torch.ones(1, t + pad, dtype=torch.bool)
        if left:
            valid[:, :pad] = False
        else:
            valid[:, t:] = False
        out = op(padded(q), padded(k), padded(v), valid, D**-0.5)
        assert torch.isfinite(out.context).all() and torch.isfinite(out.sparse_probs).all()
        if left and causal:
            assert out.context[:, :, :pad].abs().sum() == 0, "queries that see no key must give zero context"
        rows = slice(pad, None) if left else slice(0, t)
        shifted = alone.selection.key_index + (pad if left else 0)
        same_keys = (out.selection.key_index[:, :, rows] == shifted) | ~alone.selection.key_valid
        assert same_keys.float().mean() > 0.99, "padding changed which keys were selected"
        torch.testing.assert_close(out.estimate_log_probs[:, :, rows], alone.estimate_log_probs, atol=1e-4, rtol=0)
        # With the selection held fixed (the same key ranks; padding shifts only their positions), the outputs
        # must agree up to rounding.
        starts, lengths = out.selection.starts.clone(), out.selection.lengths.clone()
        starts[:, :, rows], lengths[:, :, rows] = alone.selection.starts, alone.selection.lengths
        held = SeaSelection(starts, lengths, out.selection.key_positions, out.selection.row_counts, 1)
        fixed = op(padded(q), padded(k), padded(v), valid, D**-0.5, selection=held)
        torch.testing.assert_close(fixed.context[:, :, rows], alone.context, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("anchors", [False, True])
@pytest.mark.parametrize("baseline", ["local_window", "random_mask", None])
def test_selection_rules_read_the_documented_keys(baseline, anchors):
    """local_window reads the most recent keys, random_mask a random choice of visible keys, SEA its estimate's
    choice; all within the budget and never a future key. With anchor bins every query also reads its first bin
    (when the budget leaves room after the last one) and its last bin."""
    from conftest import tiny_opt_config

    config = tiny_opt_config(sea_baseline=baseline, sea_bin_ranking="estimate", sea_candidate_factor=1, sea_key_budget=8,
                             sea_compressed_width=8, sea_anchor_bins=anchors)
    op = SeaAttention(config, 4, 16, True)
    op.init_sea_weights()
    q, k, v = (torch.randn(1, 4, 64, 16) for _ in range(3))
    selection = op(q, k, v, None, 0.25).selection
    for row in range(64):
        bin_size = (row + 1) // 8
        for head in range(4):
            keys = set(selection.key_index[0, head, row][selection.key_valid[0, head, row]].tolist())
            assert len(keys) == min(8, row + 1) and max(keys) <= row
            if anchors:
                # The last bin covers ranks [floor(7 L / 8), L); the first [0, floor(L / 8)).
                last_bin = range((row + 1) * 7 // 8, row + 1)
                assert set(last_bin) <= keys
                if bin_size + len(last_bin) <= 8:
                    assert set(range(bin_size)) <= keys
            # Bins of 1, 2, 4 or 8 keys fill the budget with whole bins. (Otherwise the bin that overflows the
            # budget gives its first keys, as `select_keys` documents.)
            if baseline == "local_window" and row + 1 in (8, 16, 32, 64):
                first = bin_size if anchors and bin_size < 8 else 0
                assert keys == set(range(first)) | set(range(row + 1 - (8 - first), row + 1))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("baseline", ["local_window", None], ids=["local_window", "sea"])
def test_first_bin_anchor_reads_the_first_key_when_rows_see_fewer_keys_than_bins(causal, baseline):
    """With M = 32 bins and a budget of 8, rows that see 9..31 keys have empty leading bins (bin b covers ranks
    [floor(b L / M), floor((b + 1) L / M))): the first anchor is the bin holding the first key, so every query
    still reads key 0 (for a local window, which would never pick it, only the anchor can)."""
    from conftest import tiny_bert_config, tiny_opt_config

    make_config = tiny_opt_config if causal else tiny_bert_config
    config = make_config(sea_baseline=baseline, sea_bin_ranking="estimate", sea_candidate_factor=1, sea_key_budget=8,
                         sea_compressed_width=32)
    op = SeaAttention(config, 4, 16, causal)
    op.init_sea_weights()
    for t in (20, 40):
        q, k, v = (torch.randn(1, 4, t, 16) for _ in range(3))
        selection = op(q, k, v, None, 0.25).selection
        read_first_key = selection.key_valid & (selection.key_index == 0)
        assert read_first_key.any(-1).all(), f"T = {t}: queries that never read key 0"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_attention_dropout_is_unbiased_and_leaves_the_returned_probabilities(causal):
    """Dropout p = 0.5 on the sparse probabilities: each call's context differs, their mean over many calls is the
    context without dropout (probabilities scaled by 1 / (1 - p)), and the returned probabilities are the ones
    before dropout."""
    op = make_operator(causal, 6)
    q, k, v = torch.randn(3, 1, H, 24, D).unbind(0)
    with torch.no_grad():
        plain = op(q, k, v, None, D**-0.5)
        dropped = [op(q, k, v, None, D**-0.5, selection=plain.selection, dropout=0.5) for _ in range(400)]
    torch.testing.assert_close(dropped[0].sparse_probs, plain.sparse_probs)
    assert not torch.allclose(dropped[0].context, dropped[1].context)
    # The mean of 400 draws is ~0.045 from the context without dropout (sampling noise, measured); unscaled dropped
    # probabilities would leave it ~0.4 away (measured: 0.41 causal, 0.45 bidirectional).
    mean = torch.stack([out.context for out in dropped]).mean(0)
    assert (mean - plain.context).norm() / plain.context.norm() < 0.1


def test_training_after_inference_mode_with_query_blocks():
    """A causal layer with query blocks run first under torch.inference_mode (as pipelines do), then trained
    without probabilities: the second forward's backward (context and estimate, as distillation does) works."""
    op = make_operator(True, 8, block=16)
    q, k, v = torch.randn(3, 1, H, 40, D).unbind(0)
    with torch.inference_mode():
        op(q, k, v, None, D**-0.5, need_probs=False)
    out = op(q, k, v.requires_grad_(), None, D**-0.5, need_probs=False)
    (out.context.square().sum() + out.estimate_log_probs.sum()).backward()
    assert v.grad is not None and op.gates.weight.grad is not None and op.row_decoder.weight.grad is not None


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_oracle_reads_the_bins_of_most_dense_attention_mass(causal):
    """The oracle baseline ranks every query's bins by their share of the dense float64 attention (built here
    densely, bin by bin), with grouped key/value heads and padding; a query given only its last rows and the
    cached keys ranks them the same (the oracle of a decode step)."""
    from conftest import tiny_bert_config, tiny_opt_config

    make_config = tiny_opt_config if causal else tiny_bert_config
    width, budget = 8, 12
    config = make_config(sea_baseline="oracle", sea_candidate_factor=1, sea_key_budget=budget, sea_compressed_width=width,
                         sea_anchor_bins=False)
    op = SeaAttention(config, 4, 16, causal, num_key_value_heads=2)
    op.init_sea_weights()
    t = 48
    q = torch.randn(N, 4, t, 16, dtype=torch.float64) * 2
    k, v = (torch.randn(N, 2, t, 16, dtype=torch.float64) * 2 for _ in range(2))
    valid = random_padding(t)
    selection = op(q.float(), k.float(), v.float(), valid, 0.25).selection
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    probs = torch.softmax(scores.masked_fill(~visibility(valid, causal), float("-inf")), -1).nan_to_num(0.0)
    chosen = selected_matrix(selection, t) > 0
    checked = 0
    for n in range(N):
        ranks = valid[n].long().cumsum(0) - 1
        for row in range(t):
            seen = visibility(valid, causal)[n, 0, row]
            length = int(seen.sum())
            if not valid[n, row] or length < width or length % width or budget % (length // width):
                continue  # equal whole bins only: then the budget holds exactly the top bins
            size = length // width
            bin_of_key = torch.where(seen, ranks // size, -1)
            for head in range(4):
                mass = torch.stack([probs[n, head, row][bin_of_key == b].sum() for b in range(width)])
                taken = min(width, budget // size)
                ordered = mass.sort(descending=True).values
                if taken < width and ordered[taken - 1] - ordered[taken] < 1e-4:
                    continue  # a near tie at the budget's edge: float32 rounding may pick either bin
                top = mass.topk(taken).indices
                assert set(chosen[n, head, row].nonzero().flatten().tolist()) == set(torch.isin(bin_of_key, top).nonzero().flatten().tolist())
                checked += 1
    assert checked >= 12
    if causal:
        last = 5
        cached = op(q[:, :, -last:].float(), k.float(), v.float(), valid, 0.25).selection
        assert torch.equal(selected_matrix(cached, t) > 0, chosen[:, :, -last:])


def bins_of_keys(seen: torch.Tensor, ranks: torch.Tensor, width: int) -> torch.Tensor:
    """The bin of each key a query sees (-1: not seen): bin b of L seen keys holds ranks floor(b L / M) ..
    floor((b + 1) L / M) - 1."""
    length = int(seen.sum())
    edges = torch.tensor([b * length // width for b in range(width + 1)])
    return torch.where(seen, torch.searchsorted(edges, ranks, right=True) - 1, -1)


def constant_rule_keys(mass: torch.Tensor, bin_of_key: torch.Tensor, budget: int) -> tuple[torch.Tensor, float]:
    """The keys the "constant" rule reads for bins of `mass`: whole bins, most mass first, the bin that overflows
    the budget giving its first keys; and the mass margin between the last bin read and the next (a near tie
    there lets rounding pick either)."""
    ordered, order = mass.sort(descending=True)
    want, left, last = torch.zeros(bin_of_key.shape[0], dtype=torch.bool), budget, 0
    for last, b in enumerate(order.tolist()):
        keys = (bin_of_key == b).nonzero().flatten()[:left]
        want[keys], left = True, left - len(keys)
        if not left:
            break
    return want, float(ordered[last] - ordered[last + 1])


def test_causal_blocks_rank_bins_by_the_window_of_rows_before_them():
    """A causal block that combines rows ranks its first row's bins by the dense float64 attention of the 16 rows
    up to that first row (each row's own causal attention, binned over the first row's keys), at its largest over
    the rows: the oracle baseline's blocks, with grouped key/value heads and padding."""
    from conftest import tiny_opt_config

    width, budget, block, t = 8, 16, 16, 96
    config = tiny_opt_config(sea_baseline="oracle", sea_candidate_factor=1, sea_key_budget=budget, sea_compressed_width=width,
                             sea_anchor_bins=False, sea_query_block_size=block, sea_block_ranking="window_max")
    op = SeaAttention(config, 4, 16, True, num_key_value_heads=2)
    op.init_sea_weights()
    q = torch.randn(N, 4, t, 16, dtype=torch.float64) * 2
    k, v = (torch.randn(N, 2, t, 16, dtype=torch.float64) * 2 for _ in range(2))
    valid = random_padding(t)
    chosen = selected_matrix(op(q.float(), k.float(), v.float(), valid, 0.25).selection, t) > 0
    seen = visibility(valid, True)[:, 0]
    checked = 0
    for n in range(N):
        ranks = valid[n].long().cumsum(0) - 1
        for first in range(block, t, block):
            length = int(seen[n, first].sum())
            if not valid[n, first] or length < 2 * budget:
                continue
            bin_of_key = bins_of_keys(seen[n, first], ranks, width)
            window = [row for row in range(first - block + 1, first + 1) if seen[n, row].any()]
            for head in range(4):
                scores = q[n, head, window] @ k[n, head // 2].T * 0.25
                probs = torch.softmax(scores.masked_fill(~seen[n, window], float("-inf")), -1)
                shares = torch.stack([probs[:, bin_of_key == b].sum(-1) for b in range(width)], -1)
                mass = shares.amax(0)
                want, margin = constant_rule_keys(mass, bin_of_key, budget)
                if margin < 1e-4:
                    continue  # a near tie at the budget's edge: float32 rounding may pick either bin
                assert torch.equal(chosen[n, head, first], want)
                checked += 1
    assert checked >= 12


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_group_selection_ranks_bins_by_their_largest_share_in_the_group(causal):
    """With `sea_group_selection` the query heads of a key/value group read one set of keys: the bins ranked by
    their largest share of dense float64 attention in any head of the group (the oracle's ranking), with padding;
    without it the heads of a group choose apart."""
    from conftest import tiny_bert_config, tiny_opt_config

    make_config = tiny_opt_config if causal else tiny_bert_config
    width, budget, t, heads, kv_heads = 8, 12, 64, 6, 2
    config = make_config(sea_baseline="oracle", sea_candidate_factor=1, sea_key_budget=budget, sea_compressed_width=width,
                         sea_anchor_bins=False, sea_group_selection=True)
    op = SeaAttention(config, heads, 16, causal, num_key_value_heads=kv_heads)
    op.init_sea_weights()
    q = torch.randn(N, heads, t, 16, dtype=torch.float64) * 2
    k, v = (torch.randn(N, kv_heads, t, 16, dtype=torch.float64) * 2 for _ in range(2))
    valid = random_padding(t)
    chosen = selected_matrix(op(q.float(), k.float(), v.float(), valid, 0.25).selection, t) > 0
    seen = visibility(valid, causal)[:, 0]
    group = heads // kv_heads
    probs = torch.softmax((q @ k.repeat_interleave(group, 1).transpose(-1, -2) * 0.25)
                          .masked_fill(~seen[:, None], float("-inf")), -1).nan_to_num(0.0)
    checked = 0
    for n in range(N):
        ranks = valid[n].long().cumsum(0) - 1
        for row in range(t):
            length = int(seen[n, row].sum())
            if not valid[n, row] or length < 2 * budget:
                continue
            bin_of_key = bins_of_keys(seen[n, row], ranks, width)
            for kv_head in range(kv_heads):
                shares = torch.stack([probs[n, kv_head * group : (kv_head + 1) * group, row, bin_of_key == b].sum(-1)
                                      for b in range(width)], -1)
                mass = shares.amax(0)
                want, margin = constant_rule_keys(mass, bin_of_key, budget)
                if margin < 1e-4:
                    continue  # a near tie at the budget's edge: float32 rounding may pick either bin
                for head in range(kv_head * group, (kv_head + 1) * group):
                    assert torch.equal(chosen[n, head, row], want)
                checked += 1
    assert checked >= 12
    op.config.sea_group_selection = False
    apart = selected_matrix(op(q.float(), k.float(), v.float(), valid, 0.25).selection, t) > 0
    assert not torch.equal(apart[:, 0::group], apart[:, 1::group])


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunks-of-rows"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_key_summary_scores_match_each_bins_keys(causal, chunked, monkeypatch):
    """The content-based bin scores against a float64 loop over every row's bins: q . (mean key of the bin), and
    Quest's bound sum_d max(q_d min_d, q_d max_d) over the bin's keys, which is at least every q . k in the bin.
    Grouped key/value heads, padded batches, rows with empty bins (fewer keys than bins) and bins of 1..9 keys; in
    one chunk of rows, and in chunks of 7 rows."""
    width, t = 8, 75
    if chunked:
        monkeypatch.setattr(sea_attention, "SCORE_CHUNK_ELEMENTS", N * 2 * (width + 1) * 16 * 7)
    q = torch.randn(N, 4, t, 16, dtype=torch.float64)
    k = torch.randn(N, 2, t, 16, dtype=torch.float64)
    valid = random_padding(t)
    counts = visible_key_counts(valid, causal, valid)
    positions = sea_attention.valid_key_positions(valid)
    means = sea_attention.key_mean_scores(q, k, valid, positions, counts, causal, 0.5, width)
    bounds = sea_attention.key_bound_scores(q, k, valid, positions, counts, causal, 0.5, width)
    edges = sea_attention.bin_edges(counts, width)
    for n in range(N):
        ranked = k[n][:, valid[n]]  # (H_kv, L, D): keys in rank order
        for row in range(t):
            for b in range(width):
                start, end = int(edges[n, row, b]), int(edges[n, row, b + 1])
                if start == end:
                    continue
                keys = ranked[:, start:end].repeat_interleave(2, 0)  # per query head
                query = q[n, :, row]
                torch.testing.assert_close(means[n, :, row, b], (query * keys.mean(1)).sum(-1) * 0.5)
                low, high = keys.amin(1), keys.amax(1)
                bound = torch.maximum(query * low, query * high).sum(-1) * 0.5
                torch.testing.assert_close(bounds[n, :, row, b], bound)
                assert (bounds[n, :, row, b] >= (keys @ query.unsqueeze(-1)).squeeze(-1).amax(-1) * 0.5 - 1e-9).all()


def exact_bin_masses(q, k, valid, causal, width, n, head, row):
    """Dense float64 attention mass of each of a query's bins, and the bin of each key (-1: not seen)."""
    scores = (k[n, head // (q.shape[1] // k.shape[1])] @ q[n, head, row]) * 0.25
    seen = visibility(valid, causal)[n, 0, row]
    probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), -1)
    length = int(seen.sum())
    ranks = valid[n].long().cumsum(0) - 1
    bin_of_key = torch.where(seen, (ranks * width) // length, -1)
    return torch.stack([probs[bin_of_key == b].sum() for b in range(width)]), bin_of_key


@pytest.mark.parametrize("block, ranking, group", [(1, "first_row", False), (16, "first_row", False),
                                                   (16, "window_max", False), (1, "first_row", True),
                                                   (16, "window_max", True)],
                         ids=["per-query", "blocks", "blocks-window-max", "per-group", "blocks-window-max-per-group"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_candidates_covering_every_key_rerank_like_the_oracle(causal, block, ranking, group):
    """With candidates that cover every visible key, the exact re-ranking of any ranking (here random bins) reads
    what the oracle baseline reads: the same bins, with anchors, blocks (also ranked by a window of rows), grouped
    heads and padding."""
    from conftest import tiny_bert_config, tiny_opt_config

    make_config = tiny_opt_config if causal else tiny_bert_config
    t, width, budget = 64, 8, 16
    fields = dict(sea_key_budget=budget, sea_compressed_width=width, sea_query_block_size=block,
                  sea_block_ranking=ranking, sea_group_selection=group)
    reranked = SeaAttention(make_config(sea_baseline="random_mask", sea_candidate_factor=t, **fields), 4, 16, causal, 2)
    oracle = SeaAttention(make_config(sea_baseline="oracle", sea_candidate_factor=1, **fields), 4, 16, causal, 2)
    for op in (reranked, oracle):
        op.init_sea_weights()
        op.double()
    q = torch.randn(N, 4, t, 16, dtype=torch.float64) * 2
    k, v = (torch.randn(N, 2, t, 16, dtype=torch.float64) * 2 for _ in range(2))
    valid = random_padding(t)
    got = selected_matrix(reranked(q, k, v, valid, 0.25).selection, t)
    want = selected_matrix(oracle(q, k, v, valid, 0.25).selection, t)
    assert torch.equal(got, want)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_reranking_keeps_the_candidates_of_most_exact_attention(causal):
    """Candidates from a local window (the bins of the newest budget keys, and of the 2 x budget keys that the
    newest-first ranking puts next): every query keeps its anchors and, of the other candidate bins, those with the
    most dense float64 attention mass; never a bin outside the candidates, however much mass it holds."""
    from conftest import tiny_bert_config, tiny_opt_config

    make_config = tiny_opt_config if causal else tiny_bert_config
    width, budget, t = 16, 12, 64
    config = make_config(sea_baseline="local_window", sea_candidate_factor=2, sea_key_budget=budget,
                         sea_compressed_width=width)
    op = SeaAttention(config, 4, 16, causal, num_key_value_heads=2)
    op.init_sea_weights()
    op.double()
    q = torch.randn(N, 4, t, 16, dtype=torch.float64) * 2
    k, v = (torch.randn(N, 2, t, 16, dtype=torch.float64) * 2 for _ in range(2))
    valid = random_padding(t)
    chosen = selected_matrix(op(q, k, v, valid, 0.25).selection, t) > 0
    checked = 0
    for n in range(N):
        for row in range(t):
            seen = visibility(valid, causal)[n, 0, row]
            length = int(seen.sum())
            if not valid[n, row] or length < width or length % width or budget % (length // width):
                continue  # equal whole bins only, the budget a whole number of them
            size = length // width
            kept, candidates = budget // size, min(width, 3 * budget // size)
            if kept >= width or candidates == kept:
                continue
            for head in range(4):
                mass, bin_of_key = exact_bin_masses(q, k, valid, causal, width, n, head, row)
                # Candidates: the anchors (bin 0 and the newest bin), then the newest other bins.
                pool = sorted(range(width - candidates + 1, width - 1), key=lambda b: -mass[b])
                if mass[pool[kept - 3]] - mass[pool[kept - 2]] < 1e-9:
                    continue  # a tie at the budget's edge
                want = torch.isin(bin_of_key, torch.tensor([0, width - 1, *pool[: kept - 2]]))
                assert torch.equal(chosen[n, head, row], want)
                checked += 1
    assert checked >= 12


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_reranked_candidates_hold_at_least_the_mass_of_sink_and_window(causal):
    """Whatever the ranking (here random bins), re-ranked candidates include the newest budget keys, so every query
    keeps at least the dense float64 attention mass that the sink + local window baseline keeps at the same budget
    (checked where bins are equal and the budget is whole bins, which the window then fills exactly)."""
    from conftest import tiny_bert_config, tiny_opt_config

    make_config = tiny_opt_config if causal else tiny_bert_config
    width, budget, t = 16, 12, 64
    fields = dict(sea_key_budget=budget, sea_compressed_width=width)
    reranked = SeaAttention(make_config(sea_baseline="random_mask", sea_candidate_factor=2, **fields), 4, 16, causal, 2)
    window = SeaAttention(make_config(sea_baseline="local_window", sea_candidate_factor=1, **fields), 4, 16, causal, 2)
    q = torch.randn(N, 4, t, 16, dtype=torch.float64) * 3
    k, v = (torch.randn(N, 2, t, 16, dtype=torch.float64) * 3 for _ in range(2))
    valid = random_padding(t)
    kept = {}
    for name, op in (("reranked", reranked), ("window", window)):
        op.init_sea_weights()
        op.double()
        kept[name] = selected_matrix(op(q, k, v, valid, 0.25).selection, t) > 0
    scores = torch.einsum("nhtd,nhsd->nhts", q, k.repeat_interleave(2, 1)) * 0.25
    probs = torch.softmax(scores.masked_fill(~visibility(valid, causal), float("-inf")), -1).nan_to_num()
    lengths = visibility(valid, causal).sum(-1)[:, 0]  # (N, T)
    whole = valid & (lengths % width == 0) & (budget % (lengths // width).clamp_min(1) == 0) & (lengths > budget)
    assert whole.sum() >= 8
    checked = whole.unsqueeze(1).expand(-1, 4, -1)
    mass = {name: (probs * chosen).sum(-1) for name, chosen in kept.items()}
    assert (mass["reranked"] >= mass["window"] - 1e-12)[checked].all()
    assert (mass["reranked"] > mass["window"] + 1e-3)[checked].any()


def test_key_summaries_put_first_the_best_bins_of_both_key_rankings():
    """The bins a budget of 2c takes under `"key_summaries"` hold the best c of the mean-key ranking and the best c
    of the bound ranking (each computed by its own function, checked against float64 loops above)."""
    width, t, c = 16, 80, 3
    q = torch.randn(N, 4, t, 16, dtype=torch.float64)
    k = torch.randn(N, 2, t, 16, dtype=torch.float64)
    valid = torch.ones(N, t, dtype=torch.bool)
    counts = visible_key_counts(valid, True, valid)
    arguments = (q, k, valid, None, counts, True, 0.5, width)
    summaries = sea_attention.key_summary_scores(*arguments)
    rows = slice(width, t)  # rows that see at least one key per bin
    taken = summaries[:, :, rows].topk(2 * c, dim=-1).indices
    for score in (sea_attention.key_mean_scores, sea_attention.key_bound_scores):
        best = score(*arguments)[:, :, rows].topk(c, dim=-1).indices
        assert (best[..., :, None] == taken[..., None, :]).any(-1).all()


def test_every_ranking_and_baseline_but_kernel_attention_is_a_bin_ranking():
    """`sea_bin_ranking`, or a `sea_baseline` that replaces it, picks a row of `BIN_RANKINGS`; only
    "kernel_attention", which replaces the sparse attention rather than ranking bins, is handled apart."""
    from sea.configuration_sea import SEA_BASELINES, SEA_BIN_RANKINGS

    assert set(sea_attention.BIN_RANKINGS) == set(SEA_BIN_RANKINGS) | set(SEA_BASELINES) - {None, "kernel_attention"}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_the_output_names_the_queries_keys_and_key_mask_it_attended_over(causal):
    """What training losses and diagnostics read from a forward hook, by name: the queries and keys as given, and
    the key mask the forward used (all True when it was given none)."""
    op = make_operator(causal, 4)
    q, k, v = torch.randn(3, 2, H, 10, D).unbind(0)
    unpadded = op(q, k, v, None, 0.25)
    assert unpadded.queries is q and unpadded.keys is k
    assert unpadded.key_valid.dtype == torch.bool and unpadded.key_valid.shape == (2, 10) and unpadded.key_valid.all()
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False
    assert op(q, k, v, valid, 0.25).key_valid is valid
