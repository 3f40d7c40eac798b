"""The SEA attention operator: the readable PyTorch reference, as plain functions.

One SEA layer, given the usual per-head queries, keys and values (N, H, T, D) and a key padding mask (N, T):

1. kernel (Performer) linear attention over `[positional code || V]` estimates, for every query, where its
   attention mass goes (O(T) cost; `kernel_encoding`);
2. a per-head encoder, a row decoder and a small CNN turn that into estimated attention logits over M bins:
   bin b of query i covers the b-th of M equal slices of the keys visible to i;
3. the best-estimated bins, after the first and last bin of the row (`sea_anchor_bins`), are expanded to key
   positions within a per-query key budget (`select_keys`);
4. exact softmax attention runs over the selected keys only (`sparse_attention`), in chunks of query rows, so
   nothing of size T x T is ever built;
5. learned gates scale the sparse attention and mix in an average context (`output_gate`).

Every Triton kernel is tested against these functions. This module imports no kernel and chooses no path:
`sea_dispatch` decides which implementation serves a call, and `sea_layer.SeaAttention` holds the weights and
runs the steps.
"""

import functools
import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers.utils import is_torchdynamo_compiling

# Rows of the causal prefix-sum linear attention processed as one exact block (also the step of the estimate
# kernels' walk).
LINEAR_ATTENTION_CHUNK = 64
# Columns from which `prefix_sum` scans a dimension in place (about the threads a large GPU keeps in flight).
SCAN_COLUMNS_IN_PLACE = 1 << 16
# Rows per pass of the estimate of a long causal input at inference (`kernel_encoding_in_passes`, and the
# column-split estimate kernels, which reuse one pass's buffer).
ESTIMATE_ROWS_PER_PASS = 4096
# Upper bound on gathered key/value elements per chunk of query rows in `sparse_attention`.
GATHER_CHUNK_ELEMENTS = 1 << 22
# Upper bound on the elements of one chunk of query rows of the bin scores (`scored_ranking`): large, as few chunks
# keep these many-row passes from being bound by launches.
SCORE_CHUNK_ELEMENTS = 1 << 26
# Upper bound on the elements of one chunk of query rows' (N, H, rows, M) rankings in per-query `select`: its
# sort, gathers and sums make several such tensors at once, which at a whole long input outweighed the KV cache.
SELECT_CHUNK_ELEMENTS = 1 << 21
# Added to kernel features so that no normaliser is exactly zero.
FEATURE_EPS = {True: 1e-3, False: 1e-4}


def prefix_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """cumsum along `dim`, in the layout CUDA scans fastest: moved last (a parallel scan per row) for few columns,
    in place (one thread per column) for many (benchmarks/results/kernel_notes.md)."""
    if x.numel() >= SCAN_COLUMNS_IN_PLACE * x.shape[dim]:
        return x.cumsum(dim)
    return x.movedim(dim, -1).cumsum(-1).movedim(-1, dim)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors upcast to float32 (normalisers and softmax); float32/float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class SeaSelection:
    """The keys each (batch, head, query) attends to, as ranges of key ranks (rank r: the r-th valid key).

    Query rows come in blocks of `rows_per_block` consecutive rows that share their ranges, and query heads in
    groups of `heads_per_selection` consecutive heads that share them too (a key/value group's heads under
    `sea_group_selection`; 1: every head its own): starts and lengths (N, H / heads_per_selection, R, K) for
    R = ceil(T / rows_per_block) blocks. A row reads its block's ranges in order, skipping ranks at
    or beyond its own visible-key count `row_counts` (N, T) (in a causal block, the keys after the row). Slot s of
    a row is the s-th rank of that concatenation; `key_positions` (N, T_all) maps ranks to key positions (None
    when every key is valid: then rank and position are the same, and the Triton kernel reads keys contiguously).
    `max_slots`, when known, bounds every row from shapes and the budget rule alone; None: `slots` is read from the
    lengths.
    """

    starts: torch.Tensor
    lengths: torch.Tensor
    key_positions: torch.Tensor | None
    row_counts: torch.Tensor
    rows_per_block: int
    max_slots: int | None = None
    heads_per_selection: int = 1

    def __post_init__(self):
        if self.max_slots is None:  # read once, here: it waits for the device
            self.max_slots = int(self.lengths.sum(-1).max()) if self.lengths.numel() else 0

    @property
    def slots(self) -> int:
        """Slots per row: `max_slots` when given, else the longest concatenation of a block's ranges. Reading that
        length waits for the device (and a traced graph, torch.export or torch.compile, cannot size tensors by it);
        the bound is what a long input's rows fill anyway, and extra slots are unused, which leaves every result the
        same."""
        return self.max_slots

    def rows(self, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key positions (N, H / heads_per_selection, last - first, slots) of query rows first..last - 1 (one per
        selection head), and which slots are used (False slots hold position 0)."""
        n, h = self.starts.shape[:2]
        block = torch.arange(first, last, device=self.starts.device) // self.rows_per_block
        starts, lengths = self.starts[:, :, block], self.lengths[:, :, block]
        shape = (n, h, last - first, self.slots)
        if self.slots == 0:
            return torch.zeros(shape, dtype=torch.long, device=starts.device), torch.zeros(shape, dtype=torch.bool, device=starts.device)
        filled = lengths.cumsum(-1)
        slot = torch.arange(self.slots, device=starts.device).expand(shape).contiguous()
        which = torch.searchsorted(filled, slot, right=True).clamp_max(starts.shape[-1] - 1)
        rank = starts.gather(-1, which) + slot - (filled - lengths).gather(-1, which)
        valid = (slot < filled[..., -1:]) & (rank < self.row_counts[:, None, first:last, None])
        rank = rank.masked_fill(~valid, 0)
        if self.key_positions is None:
            return rank, valid
        key_index = self.key_positions.gather(-1, rank.view(n, -1)).view(shape)
        return key_index.masked_fill(~valid, 0), valid

    @functools.cached_property
    def per_row(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`rows` of every query row, for every query head (N, H, T, slots), kept once computed. O(T x slots)
        memory: for inspection and training losses."""
        index, valid = self.rows(0, self.row_counts.shape[1])
        if self.heads_per_selection == 1:
            return index, valid
        return (index.repeat_interleave(self.heads_per_selection, 1),
                valid.repeat_interleave(self.heads_per_selection, 1))

    @property
    def key_index(self) -> torch.Tensor:
        return self.per_row[0]

    @property
    def key_valid(self) -> torch.Tensor:
        return self.per_row[1]


@dataclass
class SeaCausalState:
    """What a causal SEA layer carries from one forward to the next, so a decode step never revisits the prefix:
    the kernel-attention prefix sums, the running sum of valid values, and the CNN's last input and hidden rows
    (its receptive field). Every tensor has the batch on dim 0; a fresh state is all zeros."""

    kv_sum: torch.Tensor  # (N, H, F, 2D): sum of phi(k_j) [pos_j || v_j]^T
    k_sum: torch.Tensor  # (N, H, F): sum of phi(k_j)
    value_sum: torch.Tensor  # (N, H, D): sum of the valid v_j
    cnn_input_rows: torch.Tensor  # (N, C, R, W)
    cnn_hidden_rows: torch.Tensor  # (N, C, R, W)

    def map(self, fn) -> "SeaCausalState":
        """The same state with `fn` applied to every tensor (batch reordering, repetition, selection)."""
        return SeaCausalState(*(fn(getattr(self, f.name)) for f in fields(self)))


@dataclass
class SeaEstimate:
    """What `SeaAttention.estimate` makes of the new queries, before any key is selected."""

    log_probs: torch.Tensor
    """(N, H, T, M) estimated attention log-probabilities over bins; with `leading_rows_only`, (N, H, R, M): the
    first row of each block of rows only."""
    leading_rows_only: bool
    """Whether `log_probs` holds only the first row of each block of rows: of each query block (the rows that
    choose keys), or of one block of every row (a causal inference forward that ranks no bin by the estimate:
    within the key budget, or with a content ranking)."""
    encoding: torch.Tensor
    """(N, H, T, 2D) the encoding of the decoded rows ([kernel attention || v] through the encoder); with
    `leading_rows_only`, of the rows the CNN needs only. What bidirectional gates read."""
    state: SeaCausalState | None
    """The causal state after these queries (None for bidirectional layers)."""
    kernel_context: torch.Tensor | None
    """(N, H, T, D) the kernel attention of the values: the output of the "kernel_attention" baseline, computed
    only for it (None otherwise)."""
    gate: tuple[torch.Tensor, torch.Tensor] | None
    """Causal layers with gates: `output_gate`'s (scale, offset) of every new row, which the estimate's pass
    computes along the way (None otherwise; bidirectional gates read the estimate of every row, so `forward`
    computes them)."""


@dataclass
class SeaAttentionOutput:
    """One SEA layer's result, with the inputs it attended over (what training losses and diagnostics read)."""

    context: torch.Tensor
    """(N, H, T, D) the attention output."""
    sparse_probs: torch.Tensor | None
    """(N, H, T, S) the probabilities over `selection`'s slots, gate-scaled, zero in unused slots (None when the
    forward was asked for no probabilities)."""
    selection: SeaSelection | None
    """The keys each query attended to. None from an inference forward without probabilities whose per-query
    selection spans several chunks of rows (`per_query_selections`): each chunk attends once selected, so no
    selection of the whole input is kept (ask for probabilities to get it)."""
    estimate_log_probs: torch.Tensor
    """(N, H, T, M) the estimated compressed attention (log-probabilities over bins; without probabilities, causal
    query blocks give only the first row of each block, and a causal inference forward that ranks no bin by the
    estimate only its first row: `SeaEstimate.leading_rows_only`)."""
    state: SeaCausalState | None
    """The causal state after these queries (None for bidirectional layers)."""
    queries: torch.Tensor
    """(N, H, T, D) the queries as given (the forward multiplies their scores with the keys by its `scaling`)."""
    keys: torch.Tensor
    """(N, H_kv, T_all, D) the keys of every position so far."""
    key_valid: torch.Tensor
    """(N, T_all) bool, the key mask the forward used: all True when it was given none."""

    def dense_probs(self, num_keys: int) -> torch.Tensor:
        """The sparse attention as an (N, H, T, num_keys) matrix, zero outside the mask. O(T^2): for inspection."""
        n, h, t, _ = self.sparse_probs.shape
        dense = self.sparse_probs.new_zeros(n, h, t, num_keys)
        probs = self.sparse_probs * self.selection.key_valid
        return dense.scatter_add_(-1, self.selection.key_index, probs)


def visible_key_counts(key_valid: torch.Tensor, causal: bool, new_valid: torch.Tensor) -> torch.Tensor:
    """(N, T) number of valid keys visible to each of the T new queries, whose own positions' validity is
    `new_valid` (N, T): the last T positions, or wherever a static cache wrote them, as long as no valid key lies
    after them (its unfilled slots are invalid). Padded queries are computed like the others, as dense attention
    does; a query that sees no valid key gets zeros."""
    total = key_valid.sum(-1, keepdim=True)
    if not causal:
        return total.expand(new_valid.shape)
    return total - new_valid.sum(-1, keepdim=True) + new_valid.long().cumsum(-1)


def valid_key_positions(key_valid: torch.Tensor) -> torch.Tensor:
    """(N, T) positions of the valid keys, in order, followed by the padded ones: rank r -> position."""
    return torch.sort((~key_valid).to(torch.int8), dim=-1, stable=True).indices


def bin_edges(counts: torch.Tensor, width: int) -> torch.Tensor:
    """(N, T, M + 1) rank where each bin starts: bin b of a row with L visible keys covers ranks
    [floor(b L / M), floor((b + 1) L / M)); bins are empty when L < M."""
    b = torch.arange(width + 1, device=counts.device)
    return torch.div(counts.unsqueeze(-1) * b, width, rounding_mode="floor")


def visible_keys(key_valid: torch.Tensor, counts: torch.Tensor, causal: bool) -> torch.Tensor:
    """(N, C, T_all) which keys each of C query rows sees: the valid keys, and for a causal row only those of rank
    below its count (`counts` (N, C) from `visible_key_counts`)."""
    visible = key_valid[:, None, :].expand(key_valid.shape[0], counts.shape[1], key_valid.shape[1])
    if causal:
        visible = visible & (key_valid.long().cumsum(-1)[:, None, :] <= counts[:, :, None])
    return visible


def exact_attention(q, k, key_valid, counts, causal: bool, scaling: float, rows: slice):
    """Dense softmax attention probabilities (N, H, C, T_all), at least float32, of query rows `rows` of q
    (N, H, T, D), the new queries with `counts` (N, T) from `visible_key_counts`, over k (N, H_kv, T_all, D) (query
    head i reads key head i // (H / H_kv)); zero on keys a row does not see (a causal row sees the valid keys of
    rank below its count). Also which keys each row sees (N, C, T_all). O(C x T_all) per call: the teacher of the
    distillation losses and the oracle selection."""
    visible = visible_keys(key_valid, counts[:, rows], causal)
    grouped_q = at_least_float32(q[:, :, rows]).unflatten(1, (k.shape[1], -1))
    scores = (grouped_q @ at_least_float32(k).unsqueeze(2).transpose(-1, -2)).flatten(1, 2) * scaling
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0), visible


def bin_edge_prefix_lengths(key_valid: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """(N, 1, T, M + 1) for `edges` (N, T, M + 1) from `bin_edges`: how many key positions lie before the key of
    each edge's rank, so that a bin's share of a row of probabilities over positions is a difference of the row's
    prefix sums at two of these (ranks skip padded keys; rank 0 starts at length 0)."""
    n, t, edge_count = edges.shape
    after_rank = F.pad(valid_key_positions(key_valid) + 1, (1, 0))  # (N, T_all + 1): positions through rank r - 1
    return after_rank.gather(1, edges.reshape(n, -1)).view(n, 1, t, edge_count)


def binned_rows(probs: torch.Tensor, edge_prefix: torch.Tensor) -> torch.Tensor:
    """(N, H, C, M) mass of each bin in rows of probabilities over key positions (N, H, C, T_all), given the rows'
    `bin_edge_prefix_lengths` (N, 1, C, M + 1)."""
    n, h, c, _ = probs.shape
    prefix = F.pad(probs.cumsum(-1), (1, 0))
    at_edges = prefix.gather(-1, edge_prefix.expand(n, h, c, edge_prefix.shape[-1]))
    return at_edges.diff(dim=-1).clamp_min(0)


def exact_bin_log_mass(q, k, key_valid, counts, bin_counts, causal: bool, scaling: float, width: int) -> torch.Tensor:
    """(N, H, T, M) log of the dense attention mass in each of every query's M bins, computed exactly in chunks of
    query rows (nothing T x T at once, but O(T x T_all) work): what the oracle selection ranks bins by, an upper
    bound for any bin selector at the same budget. Each row attends as its `counts` let it and is binned over
    `bin_counts` (the counts its bins are laid over: `SeaRankingInputs.ranking_counts`)."""
    n, h, t, _ = q.shape
    edge_prefix = bin_edge_prefix_lengths(key_valid, bin_edges(bin_counts, width))
    rows_per_chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, n * h * k.shape[2]))
    masses = []
    for r0 in range(0, t, rows_per_chunk):
        rows = slice(r0, min(t, r0 + rows_per_chunk))
        probs, _ = exact_attention(q, k, key_valid, counts, causal, scaling, rows)
        masses.append(binned_rows(probs, edge_prefix[:, :, rows]))
    return torch.cat(masses, 2).clamp_min(torch.finfo(torch.float32).tiny).log()


def keys_by_rank(k: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """k (N, H_kv, T_all, D) reordered so that position r holds the key of rank r (padded keys last), float32+;
    `positions` from `valid_key_positions`, None when every key is valid (then ranks are positions)."""
    k = at_least_float32(k)
    if positions is None:
        return k
    return k.gather(2, positions[:, None, :, None].expand_as(k))


def grouped_scores(q: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
    """q (N, H, C, D) against per-row bin summaries (N, H_kv, C, M, D) of its key/value head: (N, H, C, M)."""
    grouped = at_least_float32(q).unflatten(1, (summaries.shape[1], -1))
    scores = torch.einsum("ngcd,ncmd->ngcm", grouped.flatten(0, 1), summaries.flatten(0, 1))
    return scores.unflatten(0, grouped.shape[:2]).flatten(1, 2)


def key_mean_scores(q, k, key_valid, positions, counts, causal: bool, scaling: float, width: int) -> torch.Tensor:
    """(N, H, T, M) q . (mean key of each bin), from prefix sums of the keys: O(M D) per query (MoBA's gate, on
    SEA's bins). A training-free content-based bin ranking."""
    n, h, t, d = q.shape
    # Summed along the last dimension: a scan over a tensor's innermost dimension is many times faster on a GPU.
    prefix = F.pad(keys_by_rank(k, positions).transpose(2, 3).cumsum(3), (1, 0))  # (N, H_kv, D, T_all + 1)
    edges = bin_edges(counts, width)
    rows_per_chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, n * k.shape[1] * (width + 1) * d))
    scores = []
    for r0 in range(0, t, rows_per_chunk):
        chunk = edges[:, r0 : r0 + rows_per_chunk]  # (N, C, M + 1)
        at_edges = prefix.gather(3, chunk.reshape(n, 1, 1, -1).expand(n, k.shape[1], d, -1)).transpose(2, 3)
        sums = at_edges.reshape(n, k.shape[1], -1, width + 1, d).diff(dim=3)
        means = sums / chunk.diff(dim=-1).clamp_min(1)[:, None, :, :, None]
        scores.append(grouped_scores(q[:, :, r0 : r0 + rows_per_chunk], means) * scaling)
    return torch.cat(scores, 2)


def key_bound_scores(q, k, key_valid, positions, counts, causal: bool, scaling: float, width: int) -> torch.Tensor:
    """(N, H, T, M) Quest's upper bound of q . k over each bin's keys, sum_d max(q_d min_d, q_d max_d) with the
    per-channel min and max of the bin's keys, read in O(M D) per query from a sparse table of range minima and
    maxima over key ranks (levels of 1, 2, 4, .. keys up to the largest bin: O(T_all D log(T_all / M)) memory).
    A training-free content-based bin ranking."""
    n, h, t, d = q.shape
    kv_heads, t_all = k.shape[1], k.shape[2]
    ranked = keys_by_rank(k, positions)
    lows, highs = [ranked], [ranked]
    while (1 << len(lows)) <= max(1, t_all // width):
        step = 1 << (len(lows) - 1)
        low, high = lows[-1], highs[-1]
        lows.append(torch.minimum(low, torch.cat([low[:, :, step:], low[:, :, -1:].expand(-1, -1, step, -1)], 2)))
        highs.append(torch.maximum(high, torch.cat([high[:, :, step:], high[:, :, -1:].expand(-1, -1, step, -1)], 2)))
    lows, highs = torch.cat(lows, 2), torch.cat(highs, 2)  # (N, H_kv, levels * T_all, D)
    edges = bin_edges(counts, width)
    smallest = (counts // width).clamp_min(1)
    level = (torch.log2(smallest.float()).floor().long()).clamp_max(lows.shape[2] // t_all - 1)  # (N, T)
    rows_per_chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, n * kv_heads * width * d))
    scores = []
    for r0 in range(0, t, rows_per_chunk):
        rows = slice(r0, min(t, r0 + rows_per_chunk))
        starts, ends = edges[:, rows, :-1], edges[:, rows, 1:]
        offset = (level[:, rows] * t_all).unsqueeze(-1)
        second = torch.maximum(ends - (1 << level[:, rows]).unsqueeze(-1), starts)
        index = torch.cat([starts, second], -1).clamp_max(t_all - 1) + offset  # (N, C, 2M)
        flat = index.reshape(n, 1, -1, 1).expand(n, kv_heads, -1, d)
        low = lows.gather(2, flat).view(n, kv_heads, -1, 2, width, d).amin(3)
        high = highs.gather(2, flat).view(n, kv_heads, -1, 2, width, d).amax(3)
        q_rows = q[:, :, rows]
        bound = grouped_scores(q_rows.clamp_min(0), high) + grouped_scores(q_rows.clamp_max(0), low)
        scores.append(bound * scaling)
    return torch.cat(scores, 2)


def key_summary_scores(q, k, key_valid, positions, counts, causal: bool, scaling: float, width: int) -> torch.Tensor:
    """(N, H, T, M) each bin's better place under `key_mean_scores` and `key_bound_scores`, negated (higher is
    better): the best c bins hold the best c/2 of each ranking, at least. The two fail on different bins (a mean
    blurs one matching key among many, a bound is loosened by any outlying channel), so their union misses less."""

    def places(scores):
        return scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)

    arguments = (q, k, key_valid, positions, counts, causal, scaling, width)
    return -torch.minimum(places(key_mean_scores(*arguments)), places(key_bound_scores(*arguments))).float()


# Wavelengths of the causal positional code grow geometrically from 2 pi to about 2 pi x this many tokens (the
# transformer's sinusoidal code): every channel is smooth in the position and none repeats within a long context.
POSITION_CODE_BASE = 10000.0


def positional_code(new_valid: torch.Tensor, counts: torch.Tensor, head_dim: int, causal: bool) -> torch.Tensor:
    """(N, T, D) position channel of the T new keys, fed to the kernel attention, by rank among the valid tokens
    (so padding does not shift it); `new_valid` is their validity and `counts` their `visible_key_counts`. No
    weights, so nothing about it grows with the context or stops at a trained length. Causal: sines and cosines
    of the rank at D / 2 geometric frequencies (a key's rank never changes as tokens are appended, so the code can
    enter prefix sums). Bidirectional (every key is new): a soft one-hot of the relative position rank / (L - 1)
    spread linearly over D channels. Zero for padded tokens."""
    rank = counts - 1 if causal else new_valid.long().cumsum(-1) - 1
    rank = rank.clamp_min(0).to(torch.float32)
    if causal:
        pairs = head_dim // 2
        frequencies = POSITION_CODE_BASE ** (-torch.arange(pairs, device=new_valid.device, dtype=torch.float32) / max(pairs, 1))
        angles = rank.unsqueeze(-1) * frequencies
        code = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
        code = F.pad(code, (0, head_dim - 2 * pairs))  # an odd head size: the last channel stays zero
    else:
        length = counts[:, :1].clamp_min(2)
        where = rank / (length - 1) * (head_dim - 1)
        channels = torch.arange(head_dim, device=new_valid.device, dtype=torch.float32)
        code = (1 - (channels - where.unsqueeze(-1)).abs()).clamp_min(0)
    return code * new_valid.unsqueeze(-1)


def kernel_features(x: torch.Tensor, projection: torch.Tensor, causal: bool, key_valid: torch.Tensor | None):
    """Random features phi(x) (N, H, T, F), at least float32, with phi(q).phi(k) ~ attention kernel.

    Causal: generalized ReLU features (positive, need no global stabiliser, so prefixes can be summed).
    Bidirectional: FAVOR+ softmax features, stabilised per query row or over the valid keys of each sequence.
    Padded keys (key_valid False) get zero features.
    """
    head_dim = x.shape[-1]
    x = at_least_float32(x) * head_dim**-0.25
    proj = x @ projection.to(x.dtype).t()
    if causal:
        features = F.relu(proj) + FEATURE_EPS[True]
    else:
        proj = proj - x.pow(2).sum(-1, keepdim=True) / 2
        if key_valid is None:
            stabiliser = proj.amax(-1, keepdim=True)
        else:
            valid = key_valid[:, None, :, None]
            stabiliser = proj.masked_fill(~valid, float("-inf")).amax(dim=(-2, -1), keepdim=True).clamp_min(-1e4)
        features = torch.exp(proj - stabiliser) + FEATURE_EPS[False]
    if key_valid is not None:
        features = features * key_valid[:, None, :, None]
    return features


def linear_attention(phi_q, phi_k, values, causal: bool, kv_sum=None, k_sum=None):
    """Kernel attention sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j), over all keys or (causal) the keys
    j <= i plus an earlier prefix summarised by `kv_sum` (..., F, E) and `k_sum` (..., F). phi_q (..., T, F),
    phi_k (..., T, F) and values (..., T, E) broadcast over their leading dims (a group of query heads sharing one
    key/value head has size 1 there on the key side). Returns the output and (causal) the prefix sums including
    these keys. The causal form works on blocks of rows: exact inside a block, running prefix sums across blocks,
    so memory stays linear in T."""
    values = values.to(phi_q.dtype)
    if not causal:
        numerator = phi_q @ (phi_k.transpose(-1, -2) @ values)
        denominator = phi_q @ phi_k.sum(-2).unsqueeze(-1)
        return numerator / denominator.clamp_min(1e-30), None
    t = phi_q.shape[-2]
    chunk = min(LINEAR_ATTENTION_CHUNK, t)
    pad = (-t) % chunk
    blocks = (t + pad) // chunk

    def blocked(x):
        return F.pad(x, (0, 0, 0, pad)).view(*x.shape[:-2], blocks, chunk, x.shape[-1])

    q, k, v = blocked(phi_q), blocked(phi_k), blocked(values)
    kv = k.transpose(-1, -2) @ v  # (..., B, F, E): one block's sum of phi(k) v^T
    kv_through = prefix_sum(kv, -3) + kv_sum.unsqueeze(-3)
    k_through = prefix_sum(k.sum(-2), -2) + k_sum.unsqueeze(-2)
    kv_before, k_before = kv_through - kv, k_through - k.sum(-2)
    within = torch.tril(q @ k.transpose(-1, -2))  # (..., B, C, C)
    numerator = q @ kv_before + within @ v
    denominator = (q @ k_before.unsqueeze(-1)).squeeze(-1) + within.sum(-1)
    out = numerator / denominator.clamp_min(1e-30).unsqueeze(-1)
    out = out.reshape(*out.shape[:-3], blocks * chunk, out.shape[-1])[..., :t, :]
    return out, (kv_through[..., -1, :, :], k_through[..., -1, :])


def select_keys(ranking: torch.Tensor, edges: torch.Tensor, budget: int, rule: str) -> tuple[torch.Tensor, ...]:
    """The best-ranked bins of every row (or block of rows) as rank ranges: starts and lengths (..., K), best first,
    and the bin of each range. Starts and lengths are int32 (what the kernels read); the bins int64 (an index).

    ranking (N, H, R, M) with empty bins at -inf; edges (N, R, M + 1) from `bin_edges`. "constant": bins are taken
    whole in ranking order until `budget` keys are filled (the overflowing bin gives its first keys), so a row of
    L <= budget keys gets all of them. "reference": round(budget * M / L) bins are taken whole.
    """
    width = ranking.shape[-1]
    starts, sizes = edges[..., :-1].unsqueeze(1), edges.diff(dim=-1).unsqueeze(1)
    top = min(width, budget) if rule == "constant" else width
    # A full sort of the M bins is faster on CUDA than a sorted top-k (a segmented sort of short rows).
    order = ranking.sort(dim=-1, descending=True, stable=True).indices[..., :top]
    top_sizes = sizes.int().expand(ranking.shape).gather(-1, order)
    top_starts = starts.int().expand(ranking.shape).gather(-1, order)
    if rule == "reference":
        counts = edges[..., -1:].unsqueeze(1)
        bins = torch.round(budget * width / counts.clamp_min(1)).clamp(1, width)
        return top_starts, top_sizes * (torch.arange(top, device=order.device) < bins), order
    before = top_sizes.cumsum(-1, dtype=torch.int32) - top_sizes
    return top_starts, top_sizes.clamp_max((budget - before).clamp_min(0)), order


def range_log_mass(q, k, v, starts, lengths, positions, counts, scaling: float, attend, max_keys: int) -> torch.Tensor:
    """(N, H, R, K) log of the share of each query row's exact softmax attention, taken over the keys of its K rank
    ranges only, that each range holds: the attention of `attend` (`sparse_attention` or its kernel) summed per
    range. q (N, H, R, D) has one row per row of ranges `starts`, `lengths` (N, H / G, R, K) (G consecutive query
    heads sharing their ranges, as in `SeaSelection`), which see `counts` (N, R) keys; `positions` as in
    `SeaSelection`; `max_keys` bounds any row's summed lengths (from shapes and settings, so that nothing waits for
    the device and a traced graph has static sizes). O(sum of lengths x D) per row, in chunks of rows so that the
    probabilities stay a bounded size."""
    h, r = q.shape[1], starts.shape[2]
    shared = h // starts.shape[1]
    slots = max(1, max_keys)
    rows_per_chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, q.shape[0] * h * slots))
    masses = []
    for r0 in range(0, r, rows_per_chunk):
        rows = slice(r0, min(r, r0 + rows_per_chunk))
        part_lengths = lengths[:, :, rows]
        selection = SeaSelection(starts[:, :, rows], part_lengths, positions, counts[:, rows], 1, slots, shared)
        probs, _ = attend(q[:, :, rows].contiguous(), k, v, selection, scaling, True)
        prefix = F.pad(at_least_float32(probs).cumsum(-1), (1, 0))
        head_lengths = part_lengths.repeat_interleave(shared, 1)  # per query head, as the probabilities are
        ends = head_lengths.cumsum(-1)
        masses.append(prefix.gather(-1, ends) - prefix.gather(-1, ends - head_lengths))
    return torch.cat(masses, 2).clamp_min(torch.finfo(torch.float32).tiny).log()


def sparse_attention(q, k, v, selection: SeaSelection, scaling: float, need_probs: bool = True, dropout: float = 0.0):
    """Exact softmax attention of each query over its selected keys only. Returns probabilities (N, H, T, S), zero
    in unused slots (a row with no key gets all zeros), or None when not `need_probs`, and the context (N, H, T, D),
    computed from the probabilities after `dropout` (> 0 only in training; the returned ones are before it).
    k and v have H_kv heads (H_kv divides H; query head i reads key/value head i // (H / H_kv)), never repeated.
    Works on chunks of query rows so the gathered keys and values stay a bounded size at any T."""
    n, h, t, d = q.shape
    kv_heads, shared = k.shape[1], selection.heads_per_selection
    slots = selection.slots
    rows = max(1, GATHER_CHUNK_ELEMENTS // max(1, n * h * slots * d))
    probs, contexts = [], []
    for r0 in range(0, t, rows):
        index, valid = selection.rows(r0, min(t, r0 + rows))  # one per selection head: its keys gathered once
        c = index.shape[2]
        flat = index.reshape(n, kv_heads, h // shared // kv_heads * c * slots, 1).expand(-1, -1, -1, d)
        k_sel = k.gather(2, flat).view(n, h // shared, c, slots, d)
        v_sel = v.gather(2, flat).view(n, h // shared, c, slots, d)
        scores = torch.einsum("nhgcd,nhcsd->nhgcs", q[:, :, r0 : r0 + rows].unflatten(1, (-1, shared)), k_sel)
        scores = at_least_float32(scores) * scaling
        valid = valid.unsqueeze(2)
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
        p = (torch.softmax(scores, dim=-1) * valid).to(v.dtype)
        if need_probs:
            probs.append(p.flatten(1, 2))
        context = torch.einsum("nhgcs,nhcsd->nhgcd", F.dropout(p, dropout) if dropout else p, v_sel)
        contexts.append(context.flatten(1, 2))
    return torch.cat(probs, 2) if need_probs else None, torch.cat(contexts, 2)


def causal_average_context(v_new, new_valid, counts, value_sum):
    """Running mean of the valid values up to each of the new queries (N, H_kv, 1, T_new, D): the same for every
    query head of a group. Also the new running sum. `counts` (N, T_new) are the valid keys visible to each query;
    `value_sum` (N, H_kv, D) sums the valid values before them."""
    through = prefix_sum(at_least_float32(v_new * new_valid[:, None, :, None]), 2) + value_sum.unsqueeze(2)
    average = (through / counts.clamp_min(1)[:, None, :, None]).to(v_new.dtype)
    return average.unsqueeze(2), through[:, :, -1]


def bidirectional_average_context(v, key_valid, estimate_log_probs, key_positions):
    """The mean value of every bin, weighted by the estimate averaged over the valid queries: one context vector
    per sequence and query head, (N, H_kv, G, 1, D) for the G query heads of each key/value head, that carries
    information from every valid key. `key_positions` from `valid_key_positions`, None when every key is valid."""
    n, h, t, d = v.shape
    if key_positions is None:
        ordered = v
    else:
        valid = key_valid[:, None, :, None].to(v.dtype)
        ordered = v.gather(2, key_positions[:, None, :, None].expand(n, h, t, d)) * valid.gather(
            2, key_positions[:, None, :, None]
        )
    prefix = F.pad(ordered.cumsum(2), (0, 0, 1, 0))  # (N, H, T + 1, D): sum of the first r valid values
    row_edges = bin_edges(key_valid.sum(-1, keepdim=True), estimate_log_probs.shape[-1])  # same for every row
    at_edges = prefix.gather(2, row_edges.reshape(n, 1, -1, 1).expand(n, h, -1, d))
    bin_means = at_edges.diff(dim=2) / row_edges.diff(dim=-1).clamp_min(1).reshape(n, 1, -1, 1)
    q_weight = key_valid[:, None, :, None].to(estimate_log_probs.dtype)
    mean_estimate = (estimate_log_probs.exp() * q_weight).sum(2) / q_weight.sum(2).clamp_min(1)
    grouped = mean_estimate.to(v.dtype).unflatten(1, (h, -1)).unsqueeze(-2)  # (N, H_kv, G, 1, M)
    return grouped @ bin_means.unsqueeze(2)


class EstimatorWeights(NamedTuple):
    """The weights `kernel_encoding` reads, as tensors (the reference and the estimate kernels take the same)."""

    feature_projection: torch.Tensor
    """(F, D) the random-feature projection of `kernel_features`."""
    encoder_weight: torch.Tensor
    """(2D, 3D) the encoder's linear layer over [estimate || v]."""
    encoder_bias: torch.Tensor
    norm_weight: torch.Tensor
    """(2D,) the encoder's layer norm, after the linear layer (then a GELU)."""
    norm_bias: torch.Tensor
    norm_eps: float
    gate_weight: torch.Tensor | None
    """(2, 2D) the output gates' linear layer (None without `sea_output_gates`)."""
    gate_bias: torch.Tensor | None


def encode(estimate: torch.Tensor, v_new: torch.Tensor, weights: EstimatorWeights) -> torch.Tensor:
    """The encoder (linear, layer norm, GELU) of [estimate || v] per query head, with the value half of its linear
    layer computed once per key/value head: estimate (N, H_kv, G, T, 2D), v_new (N, H_kv, 1, T, D)."""
    d = v_new.shape[-1]
    from_estimate, from_value = weights.encoder_weight.split([2 * d, d], dim=1)
    hidden = F.linear(estimate, from_estimate, weights.encoder_bias) + F.linear(v_new, from_value)
    return F.gelu(F.layer_norm(hidden, (2 * d,), weights.norm_weight, weights.norm_bias, weights.norm_eps))


def output_gate(encoding: torch.Tensor, average: torch.Tensor, weights: EstimatorWeights):
    """What the gates make of the sparse attention: output = scale x attention + offset, with scale
    2 sigmoid(g_0) (N, H, T, 1) and offset tanh(g_1) x average (N, H, T, D), g = the gate layer of `encoding`.
    `average` is per key/value head, (N, H_kv, 1 or G, T or 1, D): the causal running mean or the bidirectional
    context."""
    gate_logits = F.linear(encoding, weights.gate_weight, weights.gate_bias)
    mix = torch.tanh(gate_logits[..., 1:]).unflatten(1, (average.shape[1], -1))
    return 2 * torch.sigmoid(gate_logits[..., :1]), (mix * average).flatten(1, 2)


def kernel_encoding(q, k_new, v_new, code, new_valid, counts, sums, rows, weights: EstimatorWeights, causal: bool,
                    with_kernel_context: bool):
    """Kernel attention of [code || v] for the new queries (causal: continuing the carried `sums`, (kv_sum, k_sum,
    value_sum); else None), encoded with v. Returns the encoding (N, H, R, 2D) of `rows` (R of the T rows; None:
    all), the sums after these rows (causal; else None), with `with_kernel_context` the kernel attention of the
    values (N, H, T, D) (the kernel-attention baseline's output; else None), and (causal, with gates; else None)
    the output gate of every row from its encoding and the running mean of the valid values (`output_gate`,
    `causal_average_context`)."""
    n, kv_heads, t, d = v_new.shape
    augmented = torch.cat([code.unsqueeze(1).expand(n, kv_heads, t, d), v_new], dim=-1).unsqueeze(2)
    # Query heads grouped per key/value head: (N, H_kv, G, T, F) against (N, H_kv, 1, T, F).
    phi_q = kernel_features(q, weights.feature_projection, causal, None).unflatten(1, (kv_heads, -1))
    phi_k = kernel_features(k_new, weights.feature_projection, causal, new_valid).unsqueeze(2)
    carried = (sums[0].unsqueeze(2), sums[1].unsqueeze(2)) if causal else (None, None)
    estimate, new_sums = linear_attention(phi_q, phi_k, augmented, causal, *carried)
    encoding = encode(estimate.to(v_new.dtype), v_new.unsqueeze(2), weights).flatten(1, 2)
    kernel_context = estimate.flatten(1, 2)[..., d:].to(v_new.dtype) if with_kernel_context else None
    if not causal:
        return encoding, None, kernel_context, None
    average, value_sum = causal_average_context(v_new, new_valid, counts, sums[2])
    gate = output_gate(encoding, average, weights) if weights.gate_weight is not None else None
    if rows is not None:
        encoding = encoding[:, :, rows]
    return encoding, (*(x.squeeze(2) for x in new_sums), value_sum), kernel_context, gate


def kernel_encoding_in_passes(q, k_new, v_new, code, new_valid, counts, sums, rows, weights: EstimatorWeights,
                              with_kernel_context: bool, rows_per_pass: int):
    """The causal `kernel_encoding`, in passes of `rows_per_pass` rows that carry the sums from one to the next:
    the same result, with the kernel attention's per-block intermediates (N, H, T / 64, F, 2D) held for one pass at
    a time (benchmarks/results/kernel_notes.md)."""
    t = q.shape[2]
    firsts = list(range(0, t, rows_per_pass))
    # Where each pass's rows begin among the sorted `rows` (one wait for the GPU, not one per pass).
    cuts = None if rows is None else torch.searchsorted(rows, torch.tensor(firsts + [t], device=rows.device)).tolist()
    parts = []
    for index, first in enumerate(firsts):
        last = min(t, first + rows_per_pass)
        pass_rows = None if rows is None else rows[cuts[index] : cuts[index + 1]] - first
        encoding, sums, kernel_context, gate = kernel_encoding(
            q[:, :, first:last], k_new[:, :, first:last], v_new[:, :, first:last], code[:, first:last],
            new_valid[:, first:last], counts[:, first:last], sums, pass_rows, weights, True, with_kernel_context,
        )
        parts.append((encoding, kernel_context, gate))
    encodings, kernel_contexts, gates = zip(*parts)
    kernel_context = torch.cat(kernel_contexts, 2) if kernel_contexts[0] is not None else None
    gate = (torch.cat([g[0] for g in gates], 2), torch.cat([g[1] for g in gates], 2)) if gates[0] is not None else None
    return torch.cat(encodings, 2), sums, kernel_context, gate

@dataclass
class SeaRankingInputs:
    """What a bin ranking (`BIN_RANKINGS`) may read: one forward's queries and keys (as `SeaAttention.forward`
    takes them), its estimate, and how its query rows form blocks of `block_size` rows, which share one ranking
    (`select`)."""

    q: torch.Tensor
    """(N, H, T, D) the queries of the last T positions."""
    k: torch.Tensor
    """(N, H_kv, T_all, D) the keys of every position so far."""
    key_valid: torch.Tensor
    """(N, T_all) bool, True for real tokens."""
    positions: torch.Tensor | None
    """(N, T_all) from `valid_key_positions`, None without padding."""
    counts: torch.Tensor
    """(N, T) from `visible_key_counts`."""
    causal: bool
    scaling: float
    """The factor of the query-key scores."""
    width: int
    """M, the bins per row."""
    block_size: int
    """`sea_query_block_size`."""
    block_ranking: str
    """`sea_block_ranking`: how a causal block combines its rows' rankings (`per_block`)."""
    group_selection: bool
    """`sea_group_selection`: the query heads of a key/value group share their ranking (`per_group`)."""
    estimate: SeaEstimate

    @property
    def ranking_shape(self) -> tuple[int, int, int, int]:
        """(N, H, R, M): a ranking of the M bins for each of the R query blocks."""
        n, h, t, _ = self.q.shape
        return n, h, -(-t // self.block_size), self.width

    @property
    def block_counts(self) -> torch.Tensor:
        """(N, R, B) `counts` by block, zero past the last row."""
        return F.pad(self.counts, (0, (-self.counts.shape[1]) % self.block_size)).unflatten(1, (-1, self.block_size))

    @property
    def combines_causal_rows(self) -> bool:
        """Whether causal blocks rank bins from a window of rows ("window_max"), not from their first row."""
        return self.causal and self.block_size > 1 and self.block_ranking != "first_row"

    @property
    def ranked_block_of_row(self) -> torch.Tensor:
        """(T,) the block whose ranking each row's scores feed in `per_block`: its own, or, when causal blocks
        combine rows, the block whose first row ends the row's window (the next block to start at or after it).
        May be R for the last rows, which feed no block."""
        rows = torch.arange(self.counts.shape[1], device=self.counts.device)
        shift = self.block_size - 1 if self.combines_causal_rows else 0
        return (rows + shift) // self.block_size

    @property
    def ranking_counts(self) -> torch.Tensor:
        """(N, T) the visible-key counts that every row's bins are laid over when the rows are ranked: when causal
        blocks combine rows, a row of the window ending at a block's first row (`per_block`) scores that first
        row's bins, so the window's rows score the same bins; `counts` otherwise."""
        if not self.combines_causal_rows:
            return self.counts
        first_rows = (self.ranked_block_of_row * self.block_size).clamp_max(self.counts.shape[1] - 1)
        return self.counts[:, first_rows]

    def per_block(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, H, R, M) a score of each block's bins from those of its rows (N, H, T, M), read as log-masses.
        Causal with "first_row": the first row's. Causal with "window_max": over the window of block-size rows that
        ends at the block's first row (no later row: the block's selection depends on no token after its first),
        each row's scores turned into shares of its attention (a log-softmax over the bins), then per bin their
        largest over the rows that see keys. Bidirectional: the log of the block's masses summed (which ranks as
        their average)."""
        block = self.block_size
        if block == 1:
            return rows
        if self.causal and not self.combines_causal_rows:
            return rows[:, :, ::block]
        counts = self.counts
        if self.causal:
            rows = F.pad(at_least_float32(rows).log_softmax(-1), (0, 0, block - 1, 0))
            counts = F.pad(counts, (block - 1, 0))
        covered = self.ranking_shape[2] * block  # F.pad with a negative size crops
        sees_keys = (F.pad(counts, (0, covered - counts.shape[1])) > 0).unflatten(1, (-1, block))[:, None, ..., None]
        blocks = F.pad(rows, (0, 0, 0, covered - rows.shape[2])).unflatten(2, (-1, block))
        blocks = blocks.masked_fill(~sees_keys, float("-inf"))
        return blocks.amax(3) if self.causal else blocks.logsumexp(3)

    @property
    def heads_per_selection(self) -> int:
        """Query heads that share one selection (`SeaSelection.heads_per_selection`): a key/value group's with
        `group_selection`, else 1."""
        return self.q.shape[1] // self.k.shape[1] if self.group_selection else 1

    def per_group(self, ranking: torch.Tensor) -> torch.Tensor:
        """`ranking` (N, H, R, X) of X bins or ranges as one ranking per selection head (N, H / G, R, X), G =
        `heads_per_selection`: with G > 1, each head's ranking read as shares of its attention (a log-softmax over
        X) and per entry the largest over the group's heads; as it is otherwise."""
        shared = self.heads_per_selection
        if shared == 1:
            return ranking
        ranking = at_least_float32(ranking)
        shares = ranking - ranking.logsumexp(-1, keepdim=True).clamp_min(torch.finfo(ranking.dtype).min)
        return shares.unflatten(1, (-1, shared)).amax(2)


def estimated_ranking(inputs: SeaRankingInputs) -> torch.Tensor:
    """SEA: bins ranked by the estimate. (With "window_max" blocks, each row's estimate is over its own visible keys,
    whose bins are within a block of keys of the first row's: the estimate decodes bins relative to a row.)"""
    log_probs = inputs.estimate.log_probs
    return log_probs if inputs.estimate.leading_rows_only else inputs.per_block(log_probs)


def newest_first_ranking(inputs: SeaRankingInputs) -> torch.Tensor:
    """The local-window baseline: the newest bins first, whatever the queries."""
    log_probs = inputs.estimate.log_probs
    return torch.arange(inputs.width, device=log_probs.device, dtype=log_probs.dtype).expand(inputs.ranking_shape)


def random_ranking(inputs: SeaRankingInputs) -> torch.Tensor:
    """The random-mask baseline: bins in a random order, drawn afresh at every call."""
    log_probs = inputs.estimate.log_probs
    return torch.rand(inputs.ranking_shape, device=log_probs.device, dtype=log_probs.dtype)


def scored_ranking(score, inputs: SeaRankingInputs) -> torch.Tensor:
    """Bins ranked by a score of every query row against the keys, computed in the estimate's place: `score`
    takes the forward's queries and keys, `positions` and `counts`, and returns (N, H, T, M)."""
    scores = score(inputs.q, inputs.k, inputs.key_valid, inputs.positions, inputs.ranking_counts, inputs.causal,
                   inputs.scaling, inputs.width)
    return inputs.per_block(scores)


def oracle_ranking(inputs: SeaRankingInputs) -> torch.Tensor:
    """Bins ranked by the exact attention mass in them (`exact_bin_log_mass`), each row with its own causal
    attention."""
    scores = exact_bin_log_mass(inputs.q, inputs.k, inputs.key_valid, inputs.counts, inputs.ranking_counts,
                                inputs.causal, inputs.scaling, inputs.width)
    return inputs.per_block(scores)


# What `select` ranks bins by, per `sea_bin_ranking`, or per `sea_baseline` when one replaces it. Every ranking
# maps the forward's `SeaRankingInputs` to one (N, H, R, M) ranking per query block; larger ranks first.
BIN_RANKINGS = {
    "key_summaries": functools.partial(scored_ranking, key_summary_scores),
    "key_means": functools.partial(scored_ranking, key_mean_scores),
    "key_bounds": functools.partial(scored_ranking, key_bound_scores),
    "estimate": estimated_ranking,
    "local_window": newest_first_ranking,
    "random_mask": random_ranking,
    "oracle": oracle_ranking,
}


@dataclass(frozen=True)
class SelectionRule:
    """How `select` turns a bin ranking into keys: the SEA settings that shape no weight."""

    budget: int
    """`sea_key_budget`: keys per query."""
    budget_rule: str
    """`sea_budget_rule`: "constant" or "reference" (`select_keys`)."""
    candidate_factor: int
    """`sea_candidate_factor`: c > 1 re-ranks the bins of the newest budget keys and of the best c x budget keys
    exactly (`reranked`)."""
    anchor_bins: bool
    """`sea_anchor_bins`: the first and last bin of every row first (`anchored`)."""

    @property
    def candidate_budget(self) -> int:
        """Keys the candidates of `reranked` hold at most: the newest budget keys and c x budget keys besides."""
        return (self.candidate_factor + 1) * self.budget


def anchored(ranking: torch.Tensor, edges: torch.Tensor, anchor_bins: bool) -> torch.Tensor:
    """`ranking` with the anchor bins (first and last, when `anchor_bins`) first and the empty bins (from `edges`)
    last."""
    sizes = edges.diff(dim=-1)  # (N, T, M) keys per bin
    if anchor_bins:
        ranking = ranking.clone()
        # The bin holding the first key: bin 0, unless a row sees fewer keys than there are bins, whose leading
        # bins are then empty.
        first = (sizes > 0).int().argmax(-1, keepdim=True).unsqueeze(1)
        ranking.scatter_(-1, first.expand(*ranking.shape[:-1], 1), torch.finfo(ranking.dtype).max)
        ranking[..., -1] = float("inf")  # the newest bin first: with room for one bin only, a query sees itself
    return ranking.masked_fill((sizes == 0).unsqueeze(1), float("-inf"))


def reranked(ranking: torch.Tensor, edges: torch.Tensor, candidate_log_mass, rule: SelectionRule) -> torch.Tensor:
    """With a candidate factor c > 1: the bins of the newest budget keys and of the best-ranked c x budget keys
    besides, ranked again by the exact attention mass they hold among those keys (`candidate_log_mass(starts,
    lengths)`, by `range_log_mass`), the other bins last; `ranking` itself otherwise.

    The newest bins are candidates whatever the ranking: a content ranking (a mean or bound of a bin's keys) misses
    the local attention that every head also pays, and with the local window among the candidates the selection
    holds at least the exact mass of a window of whole bins at the same budget."""
    if rule.candidate_factor == 1:
        return ranking
    sizes = edges.diff(dim=-1)
    newest = (edges[..., :-1] >= edges[..., -1:] - rule.budget) & (sizes > 0)  # bins starting in the newest budget
    candidates = ranking.masked_fill(newest.unsqueeze(1), torch.finfo(ranking.dtype).max)
    starts, lengths, bins = select_keys(candidates, edges, rule.candidate_budget, "constant")
    mass = candidate_log_mass(starts, lengths).masked_fill(lengths == 0, float("-inf"))
    exact = torch.full_like(ranking, float("-inf"), dtype=mass.dtype).scatter_(-1, bins, mass)
    return anchored(exact, edges, rule.anchor_bins)


def every_visible_key(counts: torch.Tensor, positions: torch.Tensor | None, num_key_value_heads: int,
                      heads_per_key_value_head: int, num_keys: int) -> SeaSelection:
    """Each query's every visible key, as one rank range from rank 0 per row and key/value head: what every ranking
    selects when no query sees more keys than the budget, made without ranking a bin. `counts` (N, T) as
    `SeaSelection.row_counts`, `positions` as its `key_positions`; `num_keys` = T_all bounds every row."""
    n, t = counts.shape
    lengths = counts[:, None, :, None].to(torch.int32).expand(n, num_key_value_heads, t, 1)
    return SeaSelection(torch.zeros_like(lengths), lengths, positions, counts, 1, num_keys, heads_per_key_value_head)


def visible_keys_attention(q, k, v, key_valid: torch.Tensor, counts: torch.Tensor, causal: bool,
                           scaling: float) -> torch.Tensor:
    """`sparse_attention`'s context over `every_visible_key`, as one masked scaled-dot-product attention (the
    fastest dense kernel the device has, never a gathered copy of the keys): q (N, H, T, D), k and v (N, H_kv,
    T_all, D), `key_valid` (N, T_all), `counts` (N, T) from `visible_key_counts`. A row that sees no key gets
    zeros, as in `sparse_attention`."""
    sees_none = (counts == 0)[:, :, None]
    # A row that sees no key attends anywhere (no NaN) and is zeroed below.
    mask = (visible_keys(key_valid, counts, causal) | sees_none).unsqueeze(1)
    # Key/value heads repeated, as transformers' SDPA attention does under a mask: SDPA's grouped-query mode falls
    # back to its math kernel when given a mask, and the copy holds at most a budget of keys.
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return context.masked_fill(sees_none.unsqueeze(1), 0.0)


def gated(probs: torch.Tensor | None, context: torch.Tensor, gate) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The probabilities (or None) and context of an attention, scaled and offset by the output `gate` (scale,
    offset) from `output_gate` (None: no gates)."""
    if gate is None:
        return probs, context
    scale, offset = gate[0].to(context.dtype), gate[1]
    return (probs * scale if probs is not None else None), context * scale + offset


def max_selected_slots(inputs: SeaRankingInputs, rule: SelectionRule) -> int | None:
    """A bound on the keys any row reads, from shapes and the rule alone (None: read it from the lengths).

    A row's ranges are disjoint ranks of the keys it sees, so it reads at most T_all of them, and under the
    "constant" rule at most the budget plus the rest of its block. (Under the "reference" rule the bound is every
    key, which sizes the slots only where their lengths cannot be read: in a traced graph.)"""
    num_keys = inputs.k.shape[2]
    if rule.budget_rule == "constant":
        return min(num_keys, rule.budget + inputs.block_size - 1)
    return num_keys if is_torchdynamo_compiling() else None


def selection_chunk_rows(inputs: SeaRankingInputs) -> int:
    """Query rows per chunk of per-query selection (`SELECT_CHUNK_ELEMENTS`)."""
    n, h, _, _ = inputs.q.shape
    return max(1, SELECT_CHUNK_ELEMENTS // max(1, n * h * inputs.width))


def per_query_selections(inputs: SeaRankingInputs, ranking: torch.Tensor, rows_log_mass, rule: SelectionRule):
    """`select` with blocks of one row, in chunks of `selection_chunk_rows` consecutive query rows: yields each
    chunk's rows (a slice) and their `SeaSelection` (each row's selection is its own). `ranking` as `select` takes
    it."""
    ranking = inputs.per_group(ranking)
    step, slots = selection_chunk_rows(inputs), max_selected_slots(inputs, rule)
    for first in range(0, ranking.shape[2], step):
        rows = slice(first, first + step)
        counts = inputs.counts[:, rows]
        edges = bin_edges(counts, inputs.width)

        def candidate_log_mass(starts, lengths, rows=rows, counts=counts):
            return inputs.per_group(rows_log_mass(rows, starts, lengths, counts))

        chunk = reranked(anchored(ranking[:, :, rows], edges, rule.anchor_bins), edges, candidate_log_mass, rule)
        starts, lengths, _ = select_keys(chunk, edges, rule.budget, rule.budget_rule)
        yield rows, SeaSelection(starts, lengths, inputs.positions, counts, 1, slots, inputs.heads_per_selection)


def select(inputs: SeaRankingInputs, ranking: torch.Tensor, rows_log_mass, rule: SelectionRule) -> SeaSelection:
    """The keys of every query: the bins of `ranking` (N, H, R, M) (from `BIN_RANKINGS`), through `anchored`, then
    `reranked`, expanded by `select_keys`, shared by blocks of `inputs.block_size` consecutive queries (and, with
    `inputs.group_selection`, by the query heads of a key/value group: `SeaRankingInputs.per_group`).

    A causal block takes bins of its first row's keys (which every row of the block sees), ranked as
    `SeaRankingInputs.per_block` combines rows up to its first (`sea_block_ranking`), plus one range holding the
    keys after the first row's, which each row reads up to itself: a row reads at most budget + block size - 1
    keys. A bidirectional block takes the bins of the row that sees the most keys, ranked as `per_block` combines
    its rows.
    `rows_log_mass(rows, starts, lengths, counts)`: `range_log_mass` of the query rows `rows` (a slice). Per-query
    selections are made in chunks of rows (`per_query_selections`); `max_selected_slots` bounds every row's keys."""
    counts, max_slots = inputs.counts, max_selected_slots(inputs, rule)
    if inputs.block_size == 1:
        chunks = [chunk for _, chunk in per_query_selections(inputs, ranking, rows_log_mass, rule)]
        starts, lengths = (torch.cat([getattr(chunk, name) for chunk in chunks], 2) for name in ("starts", "lengths"))
        return SeaSelection(starts, lengths, inputs.positions, counts, 1, max_slots, inputs.heads_per_selection)
    block = inputs.block_size
    ranking = inputs.per_group(ranking)
    block_counts = inputs.block_counts
    first_counts = block_counts[..., 0] if inputs.causal else block_counts.amax(-1)
    if inputs.causal and not inputs.combines_causal_rows:
        def block_log_mass(starts, lengths):
            return rows_log_mass(slice(None, None, block), starts, lengths, first_counts)
    else:
        def block_log_mass(starts, lengths):  # the mass of the rows `per_block` combines, in the block's ranges
            block_of_row = inputs.ranked_block_of_row.clamp_max(starts.shape[2] - 1)
            return inputs.per_block(rows_log_mass(slice(None), starts[:, :, block_of_row], lengths[:, :, block_of_row],
                                                  counts))
    edges = bin_edges(first_counts, inputs.width)
    ranking = reranked(anchored(ranking, edges, rule.anchor_bins), edges,
                       lambda starts, lengths: inputs.per_group(block_log_mass(starts, lengths)), rule)
    starts, lengths, _ = select_keys(ranking, edges, rule.budget, rule.budget_rule)
    if inputs.causal:  # the newest range: ranks first_count .. (the block's largest count - 1)
        newest = block_counts.amax(-1) - first_counts
        per_head = (*starts.shape[:-1], 1)
        starts = torch.cat([starts, first_counts[:, None, :, None].to(starts.dtype).expand(per_head)], -1)
        lengths = torch.cat([lengths, newest[:, None, :, None].to(lengths.dtype).expand(per_head)], -1)
    return SeaSelection(starts, lengths, inputs.positions, counts, block, max_slots, inputs.heads_per_selection)


def orthogonal_gaussian_features(num_features: int, dim: int) -> torch.Tensor:
    """(F, D) FAVOR+ projection: stacked random orthogonal blocks, rows scaled to Gaussian norms. Drawn in float32
    whatever the default dtype (a model built in half precision: CPU QR has no half-precision kernel)."""
    blocks = [torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float32))[0].t() for _ in range(math.ceil(num_features / dim))]
    rows = torch.cat(blocks)[:num_features]
    return rows * torch.randn(num_features, dim, dtype=torch.float32).norm(dim=-1, keepdim=True)
