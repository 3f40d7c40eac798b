"""The SEA layer: `SeaAttention`, the `nn.Module` that holds one attention layer's SEA weights and runs the steps of
`sea_attention` (the PyTorch reference) through `sea_dispatch` (which chooses the implementation of each step).

Inference, for that choice, means that no gradient is wanted: `torch.is_grad_enabled()` is False when the layer
is called (not the module's eval mode: an eval forward with gradients on, e.g. for an attribution, stays
differentiable). The layer reads it once, at the top of its forward, and passes it on explicitly.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import is_torchdynamo_compiling

from .configuration_sea import SEA_DECODER_WIDTH_DIVISOR
from .sea_attention import (
    BIN_RANKINGS,
    EstimatorWeights,
    SeaAttentionOutput,
    SeaCausalState,
    SeaEstimate,
    SeaRankingInputs,
    SeaSelection,
    SelectionRule,
    at_least_float32,
    bidirectional_average_context,
    bin_edges,
    every_visible_key,
    gated,
    orthogonal_gaussian_features,
    output_gate,
    per_query_selections,
    positional_code,
    range_log_mass,
    select,
    selection_chunk_rows,
    valid_key_positions,
    visible_key_counts,
    visible_keys_attention,
)
from .sea_dispatch import estimate_encoding, gated_sparse_attention, sparse_attention_implementation

# Decoder channels per head: causal models decode 2 channels of M/4 bins, bidirectional ones 4 channels of M/2.
DECODER_CHANNELS = {True: 2, False: 4}


@functools.lru_cache(maxsize=32)
def _causal_cnn_rows(block: int, reach: int, num_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`SeaRowCnn.rows_needed` for a CNN that reads `reach` rows above each row. Built outside inference mode: the
    kept tensors also index forwards that train."""
    if block <= reach:
        raise ValueError(f"query blocks of {block} rows are shorter than the CNN's reach of {reach} rows")
    with torch.inference_mode(False):
        window = torch.arange(-reach, 1, device=device)
        windows = (torch.arange(block, max(block, num_rows), block, device=device)[:, None] + window).flatten()
        last_first = (num_rows - 1) // block * block
        tail = torch.arange(max(num_rows - 1 - reach, last_first + 1), num_rows, device=device)
        rows = torch.cat([torch.zeros(1, dtype=torch.long, device=device), windows, tail])
        return rows, torch.arange(0, last_first + 1, block, device=device) // block * (reach + 1)


class SeaRowCnn(nn.Module):
    """Refines the decoded rows (N, H * c, T, M / s) into estimated attention logits (N, H, T, M).

    Convolutions run over the (query, bin) image of all heads. Causal models pad only above, so row t never sees
    a later row (receptive field: rows t - 8 .. t); bidirectional ones use plain 3 x 3 convolutions. Padded query
    rows are zeroed after every layer, which makes a padded batch match each sequence alone."""

    def __init__(self, num_heads: int, width: int, causal: bool):
        super().__init__()
        channels = num_heads * DECODER_CHANNELS[causal]
        self.causal = causal
        self.upsample = SEA_DECODER_WIDTH_DIVISOR[causal]
        self.row_dilation = 2 if causal else 1
        self.input_norm = nn.LayerNorm(width // self.upsample)
        self.conv1 = nn.Conv2d(channels, channels, 3, dilation=(self.row_dilation, 1))
        self.conv2 = nn.Conv2d(channels, channels, 3, dilation=(self.row_dilation, 1))
        self.to_heads = nn.Conv2d(channels, num_heads, 1)
        self.output_norm = nn.LayerNorm(width)

    @property
    def rows_above(self) -> int:
        """Earlier rows one causal convolution reads: its receptive field above the current row."""
        return 2 * self.row_dilation

    def rows_needed(self, block: int, num_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows (sorted, of 0 .. num_rows - 1) whose input a causal CNN needs for its output at the first row of
        every `block` rows and for its memory of the last rows, and where those first rows are among them. Run on
        just these rows (with the same state), the CNN gives the same output there and the same memory: each first
        row comes with the `reach` rows its two convolutions read above it (row 0 reads the state), and so does the
        last row. Built from host integers, so no step waits for the GPU, and kept per length (read-only), except
        while tracing (torch.export, torch.compile), whose tensors must not outlive the trace."""
        build = _causal_cnn_rows.__wrapped__ if is_torchdynamo_compiling() else _causal_cnn_rows
        return build(block, self.reach, num_rows, device)

    @property
    def reach(self) -> int:
        """Earlier rows the causal CNN's two convolutions read together above each row."""
        return 2 * self.rows_above

    def _conv(self, conv: nn.Conv2d, x: torch.Tensor, row_valid: torch.Tensor, above: torch.Tensor | None):
        """Causal: `above` holds the rows before `x` (zeros at the start of a sequence). Bidirectional: zero
        padding on both sides."""
        if above is not None:
            x = torch.cat([above, x], dim=2)
            padded = F.pad(x, (1, 1, 0, 0))
        else:
            padded = F.pad(x, (1, 1, self.row_dilation, self.row_dilation))
        return F.relu(conv(padded)) * row_valid

    def forward(self, rows: torch.Tensor, row_valid: torch.Tensor, state: SeaCausalState | None = None,
                output_rows: torch.Tensor | None = None):
        """Logits (N, H, T, M) (only at `output_rows`, when given) and, for causal models, the last input and
        hidden rows for the next call."""
        x = self.input_norm(rows) * row_valid
        if not self.causal:
            hidden = self._conv(self.conv1, x, row_valid, None)
            refined = x + self._conv(self.conv2, hidden, row_valid, None)
            memory = None
        else:
            hidden = self._conv(self.conv1, x, row_valid, state.cnn_input_rows)
            refined = x + self._conv(self.conv2, hidden, row_valid, state.cnn_hidden_rows)
            keep = self.rows_above
            # Only the last rows are concatenated: a slice of the whole concatenation would keep all of it alive
            # in the cache.
            memory = (
                torch.cat([state.cnn_input_rows, x[:, :, -keep:]], dim=2)[:, :, -keep:],
                torch.cat([state.cnn_hidden_rows, hidden[:, :, -keep:]], dim=2)[:, :, -keep:],
            )
        if output_rows is not None:
            refined = refined[:, :, output_rows]
        refined = refined.repeat_interleave(self.upsample, dim=-1)
        return self.output_norm(self.to_heads(refined)), memory


def _config_setting(field: str) -> property:
    """A read-only attribute of `SeaAttention` that reads `field` from its config at every access."""
    return property(lambda self: getattr(self.config, field), doc=f"`config.{field}`, read at every call")


class SeaAttention(nn.Module):
    """The SEA parameters of one attention layer and its forward pass (the steps: `sea_attention`'s docstring).

    The q/k/v/o projections stay with the backbone's attention module; this module receives per-head q, k, v.
    With grouped-query attention (`num_key_value_heads` < `num_heads`), k and v have one head per group of query
    heads; everything computed from keys and values alone (kernel-attention sums, running value sums, the gathered
    keys) stays per key/value head.
    """

    def __init__(self, config, num_heads: int, head_dim: int, causal: bool, num_key_value_heads: int | None = None):
        super().__init__()
        self.causal = causal
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads or num_heads
        if num_heads % self.num_key_value_heads:
            raise ValueError(f"{num_heads} query heads cannot be grouped over {self.num_key_value_heads} key/value heads.")
        self.head_dim = head_dim
        # The SEA settings that shape no weight (key budget, rule, ranking, candidates, baseline, anchors, kernel,
        # query blocks) are read from the config at every call: a changed config acts at once, as it is saved.
        self.config = config
        self.width = config.sea_compressed_width
        num_features = max(1, int(head_dim * math.log(head_dim) / config.sea_performer_nb_factor))
        self.register_buffer("feature_projection", torch.empty(num_features, head_dim))
        # The encoder's weights, saved as encoder.0 and encoder.1: `sea_attention.encode` applies the linear layer,
        # the layer norm, then a GELU.
        self.encoder = nn.Sequential(nn.Linear(3 * head_dim, 2 * head_dim), nn.LayerNorm(2 * head_dim))
        channels = DECODER_CHANNELS[causal]
        self.row_decoder = nn.Linear(2 * head_dim, channels * self.width // SEA_DECODER_WIDTH_DIVISOR[causal])
        self.cnn = SeaRowCnn(num_heads, self.width, causal)
        self.gates = nn.Linear(2 * head_dim, 2) if config.sea_output_gates else None

    budget = _config_setting("sea_key_budget")
    budget_rule = _config_setting("sea_budget_rule")
    bin_ranking = _config_setting("sea_bin_ranking")
    candidate_factor = _config_setting("sea_candidate_factor")
    baseline = _config_setting("sea_baseline")
    anchor_bins = _config_setting("sea_anchor_bins")
    kernel = _config_setting("sea_kernel")
    query_block_size = _config_setting("sea_query_block_size")
    block_ranking = _config_setting("sea_block_ranking")
    group_selection = _config_setting("sea_group_selection")

    @property
    def kernel_attention_only(self) -> bool:
        """The "kernel_attention" baseline: the layer's output is the kernel attention of the values itself, with
        no key selected and no sparse attention. Not a bin ranking (`BIN_RANKINGS`): it replaces the attention, not
        the choice of keys, so `forward` and the estimate's pass branch on it."""
        return self.baseline == "kernel_attention"

    @property
    def ranks_by_estimate(self) -> bool:
        """Whether anything but the causal state reads the estimated rows: SEA's ranking by them, or the kernel
        attention of the "kernel_attention" baseline."""
        return self.kernel_attention_only or (self.baseline is None and self.bin_ranking == "estimate")

    @torch.no_grad()
    def init_sea_weights(self):
        """Initialise what a converted model adds beyond ordinary layers: fresh random features and neutral gates
        (sparse scale 1, no average context), so conversion starts from the dense model.
        Uses transformers' init functions, which leave weights loaded from a checkpoint untouched."""
        init.copy_(self.feature_projection, orthogonal_gaussian_features(*self.feature_projection.shape))
        if self.gates is not None:
            init.zeros_(self.gates.weight)
            init.zeros_(self.gates.bias)

    def initial_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> SeaCausalState:
        """The state before the first token: empty prefix sums and zero CNN rows (the convolutions' padding)."""
        h, d, f = self.num_key_value_heads, self.head_dim, self.feature_projection.shape[0]
        sums = at_least_float32(torch.zeros((), dtype=dtype)).dtype
        rows = torch.zeros(batch_size, self.cnn.to_heads.in_channels, self.cnn.rows_above, self.cnn.input_norm.normalized_shape[0], dtype=dtype, device=device)
        return SeaCausalState(
            kv_sum=torch.zeros(batch_size, h, f, 2 * d, dtype=sums, device=device),
            k_sum=torch.zeros(batch_size, h, f, dtype=sums, device=device),
            value_sum=torch.zeros(batch_size, h, d, dtype=sums, device=device),
            cnn_input_rows=rows,
            cnn_hidden_rows=rows.clone(),
        )

    def estimate(self, q, k_new, v_new, new_valid, counts, state, inference: bool,
                 leading_block: int | None = None) -> SeaEstimate:
        """The estimate of the new queries' attention over bins (causal, with a `leading_block`: of the first row of
        every `leading_block` rows only), with what its pass computes along the way (`SeaEstimate`). `k_new`,
        `v_new` and `new_valid` are the keys, values and validity of the new positions; `inference` as in the
        module docstring."""
        n, _, t, d = v_new.shape
        h = self.num_heads
        code = positional_code(new_valid, counts, d, self.causal).to(v_new.dtype)
        needed = leading = None
        leading_rows_only = leading_block is not None
        if leading_rows_only:  # decode and refine only the rows the CNN needs for those rows and for its memory
            needed, leading = self.cnn.rows_needed(leading_block, t, q.device)
        sums = (state.kv_sum, state.k_sum, state.value_sum) if self.causal else None
        encoding, new_sums, kernel_context, gate = estimate_encoding(
            q, k_new, v_new, code, new_valid, counts, sums, needed, self.estimator_weights, self.causal,
            self.kernel_attention_only, self.kernel, inference,
        )
        row_valid = new_valid if needed is None else new_valid[:, needed]
        r = encoding.shape[2]
        rows = self.row_decoder(encoding).view(n, h, r, DECODER_CHANNELS[self.causal], -1)
        rows = rows.permute(0, 1, 3, 2, 4).reshape(n, -1, r, rows.shape[-1])
        logits, cnn_rows = self.cnn(rows, row_valid[:, None, :, None].to(rows.dtype), state, leading)
        logits = at_least_float32(logits)
        if leading_rows_only:
            counts = counts[:, ::leading_block]
        empty = (bin_edges(counts, self.width).diff(dim=-1) == 0).unsqueeze(1)
        logits = logits.masked_fill_(empty, torch.finfo(logits.dtype).min)  # in place: one (N, H, T, M) less
        if self.causal:
            state = SeaCausalState(*new_sums, *cnn_rows)
        return SeaEstimate(torch.log_softmax(logits, dim=-1), leading_rows_only, encoding, state, kernel_context, gate)

    @property
    def estimator_weights(self) -> EstimatorWeights:
        """The weights of the kernel encoding, as the reference and the kernels take them."""
        linear, norm = self.encoder[0], self.encoder[1]
        gates = (self.gates.weight, self.gates.bias) if self.gates is not None else (None, None)
        return EstimatorWeights(self.feature_projection, linear.weight, linear.bias, norm.weight, norm.bias, norm.eps,
                                *gates)

    @property
    def selection_rule(self) -> SelectionRule:
        """How `select` turns bin rankings into keys, from the config as it is now."""
        return SelectionRule(self.budget, self.budget_rule, self.candidate_factor, self.anchor_bins)

    def attention_in_chunks(self, inputs: SeaRankingInputs, ranking, rows_log_mass, v, gate) -> torch.Tensor:
        """The context of an inference forward with per-query selection and no probabilities, each chunk of rows
        (`per_query_selections`) attending once selected, so no selection of the whole input is ever held."""
        contexts = []
        for rows, chunk in per_query_selections(inputs, ranking, rows_log_mass, self.selection_rule):
            rows_gate = None if gate is None else tuple(g[:, :, rows] for g in gate)
            contexts.append(gated_sparse_attention(inputs.q[:, :, rows], inputs.k, v, chunk, inputs.scaling, rows_gate,
                                                   False, self.kernel, True, 0.0)[1])
        return torch.cat(contexts, 2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_valid: torch.Tensor | None,
        scaling: float,
        selection: SeaSelection | None = None,
        state: SeaCausalState | None = None,
        need_probs: bool = True,
        dropout: float = 0.0,
        new_slots: torch.Tensor | None = None,
    ) -> SeaAttentionOutput:
        """q: (N, H, T, D) queries of the last T positions; k, v: (N, H_kv, T_all, D) keys and values of every
        position so far (T_all = T without a cache); key_valid: (N, T_all) bool, True for real tokens (None: no
        padding). Causal layers continue from `state` (None: the start of the sequence), which must summarise
        exactly the first T_all - T positions. A given `selection` replaces the estimated one (to compare two
        passes with the same keys). Without `need_probs` the output's `sparse_probs` is None, which spares the
        (N, H, T, S) probabilities and lets the Triton kernel skip writing them; causal layers with query blocks
        ranked by their first row (`sea_block_ranking="first_row"`) then also estimate only the rows that choose
        keys (the first of every block): `estimate_log_probs` has one row per block; so do causal inference
        forwards whose keys all fit in the budget or whose ranking reads no estimate (`ranks_by_estimate`), as one
        block of every row (the estimate still carries the state on). Training losses and plots ask for probabilities
        and get every row. `dropout`: the attention dropout of the sparse probabilities, which the model passes in training only (as transformers'
        attention does); it changes the context, not the returned probabilities. `new_slots` (T,): where the
        new positions lie in k, v and key_valid when they are not the last T, as in a static cache's buffers,
        whose unfilled slots after them `key_valid` marks invalid. An inference forward without probabilities
        selects and attends in chunks of rows and returns no `selection` (`SeaAttentionOutput.selection`) when its
        per-query selection spans several chunks."""
        inference = not torch.is_grad_enabled()  # the one place the grad mode is read (see the module docstring)
        n, _, t, _ = q.shape
        if torch.compiler.is_exporting() and not isinstance(k.shape[2], int):
            raise ValueError(
                "SEA models export with a static sequence length: the chunked passes of the estimate and of the "
                "sparse attention are laid out by it. Export without `dynamic_shapes` for the sequence dimension, "
                "once per length you need."
            )
        unpadded = key_valid is None
        if unpadded:
            key_valid = torch.ones(n, k.shape[2], dtype=torch.bool, device=q.device)
        if self.causal and state is None:
            state = self.initial_state(n, v.dtype, v.device)
        if new_slots is None:
            k_new, v_new, new_valid = k[:, :, -t:], v[:, :, -t:], key_valid[:, -t:]
        else:
            k_new, v_new, new_valid = k.index_select(2, new_slots), v.index_select(2, new_slots), key_valid.index_select(1, new_slots)
        counts = visible_key_counts(key_valid, self.causal, new_valid)
        # No padding: a key's rank is its position. A given mask of all ones is checked, which waits for the GPU,
        # and is data that a traced graph (torch.export, torch.compile) cannot branch on: there a given mask takes
        # the general path, which gives the same result.
        unpadded = unpadded or (not is_torchdynamo_compiling() and bool(key_valid.all()))
        positions = None if unpadded else valid_key_positions(key_valid)
        within_budget = selection is None and k.shape[2] <= self.budget
        plain_inference = inference and not need_probs and not dropout
        dense_inference = within_budget and plain_inference
        leading_block = None
        if self.causal and plain_inference and (within_budget or not self.ranks_by_estimate):
            # Nothing ranks by the estimate and nothing returned reads it: only its first row (one block of every
            # row) and the CNN's memory for the next call are decoded.
            leading_block = max(t, self.cnn.reach + 1)
        elif self.causal and self.query_block_size > 1 and self.block_ranking == "first_row" and not need_probs:
            leading_block = self.query_block_size
        estimate = self.estimate(q, k_new, v_new, new_valid, counts, state, inference, leading_block)

        def output(context, probs, selection):
            return SeaAttentionOutput(context, probs, selection, estimate.log_probs, estimate.state, q, k, key_valid)

        if self.kernel_attention_only:  # no keys to rank: the output is the kernel attention itself
            nothing = torch.zeros(n, q.shape[1], t, 0, dtype=torch.long, device=q.device)
            no_keys = SeaSelection(nothing, nothing, positions, counts, 1)
            return output(estimate.kernel_context, nothing.to(q.dtype), no_keys)
        gate = estimate.gate
        if not self.causal and self.gates is not None:
            average = bidirectional_average_context(v, key_valid, estimate.log_probs, positions)
            gate = output_gate(estimate.encoding, average, self.estimator_weights)
        if within_budget:
            # No query sees more keys than the budget: every ranking would select all of them, so none is ranked,
            # and without probabilities to return the attention is the dense one.
            selection = every_visible_key(counts, positions, self.num_key_value_heads,
                                          self.num_heads // self.num_key_value_heads, k.shape[2])
            if dense_inference:
                context = visible_keys_attention(q, k, v, key_valid, counts, self.causal, scaling)
                return output(gated(None, context, gate)[1], None, selection)
        if selection is None:
            with torch.no_grad():
                attend = sparse_attention_implementation(q, self.kernel)

                candidate_keys = min(k.shape[2], self.selection_rule.candidate_budget)

                def rows_log_mass(rows, starts, lengths, row_counts):
                    return range_log_mass(q[:, :, rows], k, v, starts, lengths, positions, row_counts, scaling, attend,
                                          candidate_keys)

                inputs = SeaRankingInputs(q, k, key_valid, positions, counts, self.causal, scaling, self.width,
                                          self.query_block_size, self.block_ranking, self.group_selection,
                                          estimate)
                ranking = BIN_RANKINGS[self.baseline or self.bin_ranking](inputs)
                if plain_inference and self.query_block_size == 1 \
                        and t > selection_chunk_rows(inputs):
                    return output(self.attention_in_chunks(inputs, ranking, rows_log_mass, v, gate), None, None)
                selection = select(inputs, ranking, rows_log_mass, self.selection_rule)
        probs, context = gated_sparse_attention(q, k, v, selection, scaling, gate, need_probs, self.kernel, inference,
                                                dropout)
        return output(context, probs, selection)

