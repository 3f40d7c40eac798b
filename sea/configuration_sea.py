"""Configurations of the SEA models (Sparse linear attention with an Estimated Attention mask), and the registry of
the model families SEA converts.

Each SEA config is the backbone's own config (OPT, Llama, Qwen2, Qwen3, Mistral, BERT) plus the `sea_*` fields read
by `SeaAttention`. `SEA_FAMILIES` holds one `SeaFamily` record per family, read by the models, conversion,
distillation, the trainer and the tests.
"""

from collections.abc import Callable
from dataclasses import dataclass

from transformers import BertConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config
from transformers.utils import logging

logger = logging.get_logger(__name__)

SEA_BUDGET_RULES = ("constant", "reference")
SEA_KERNELS = ("auto", "triton", "torch")
# 1, or block sizes the Triton kernel's matrix products take (tl.dot needs at least 16 rows).
SEA_QUERY_BLOCK_SIZES = (1, 16, 32, 64, 128)
# How a causal query block ranks bins from its queries' rankings (`sea_block_ranking`).
SEA_BLOCK_RANKINGS = ("first_row", "window_max")
# How SEA ranks each query's bins (`sea_bin_ranking`), and the comparison baselines that replace it (`sea_baseline`).
SEA_BIN_RANKINGS = ("key_summaries", "key_means", "key_bounds", "estimate")
SEA_BASELINES = (None, "kernel_attention", "local_window", "random_mask", "oracle")

# Width reduction of the row decoder before the CNN (see `SeaAttention`): causal models decode M/4 bins in 2
# channels per head, bidirectional ones M/2 bins in 4 channels, as in the reference implementation.
SEA_DECODER_WIDTH_DIVISOR = {True: 4, False: 2}


def _is_integer(value) -> bool:
    """An int that is not a bool (True would pass `isinstance(value, int)`)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SeaFieldRule:
    """The values one SEA field accepts: those `accepts(value, divisor)` holds for (`divisor`: the config's
    `SEA_DECODER_WIDTH_DIVISOR`), which `allowed` names in words (formatted with `divisor` and the `config` class
    name); `choices` lists them when they are a finite set, for the command lines to offer."""

    accepts: Callable[[object, int], bool]
    allowed: str
    choices: tuple | None = None


def _one_of(choices: tuple, note: str = "") -> SeaFieldRule:
    return SeaFieldRule(lambda value, divisor: value in choices, f"one of {choices}{note}", choices)


def _is_flag(value, divisor) -> bool:
    return isinstance(value, bool)


# The one definition of what each SEA field accepts: `SeaConfigMixin.validate_sea_fields` checks them in this order
# and names the first field that breaks its rule. (huggingface_hub's `validated_field` would check each assignment,
# not construction and save, could not see the config's causality, and rewords the errors.)
SEA_FIELD_RULES = {
    "sea_key_budget": SeaFieldRule(
        lambda budget, divisor: _is_integer(budget) and budget >= 1, "an integer >= 1 (keys per query and head)"
    ),
    "sea_compressed_width": SeaFieldRule(
        lambda width, divisor: _is_integer(width) and width >= divisor and width % divisor == 0,
        "a positive multiple of {divisor} for {config}",
    ),
    "sea_performer_nb_factor": SeaFieldRule(
        lambda factor, divisor: not isinstance(factor, bool) and isinstance(factor, (int, float)) and factor > 0,
        "a number > 0",
    ),
    "sea_budget_rule": _one_of(SEA_BUDGET_RULES),
    "sea_bin_ranking": _one_of(SEA_BIN_RANKINGS),
    "sea_candidate_factor": SeaFieldRule(
        lambda factor, divisor: _is_integer(factor) and factor >= 1, "an integer >= 1 (1: no exact re-ranking)"
    ),
    "sea_anchor_bins": SeaFieldRule(_is_flag, "True or False"),
    "sea_output_gates": SeaFieldRule(_is_flag, "True or False"),
    "sea_query_block_size": _one_of(SEA_QUERY_BLOCK_SIZES),
    "sea_block_ranking": _one_of(SEA_BLOCK_RANKINGS),
    "sea_group_selection": SeaFieldRule(_is_flag, "True or False"),
    "sea_kernel": _one_of(SEA_KERNELS),
    "sea_baseline": _one_of(
        SEA_BASELINES, f" (the content rankings are values of `sea_bin_ranking`: {SEA_BIN_RANKINGS})"
    ),
}


def with_bin_ranking(config_dict: dict) -> dict:
    """A saved SEA config as this code reads it. Configs saved before `sea_bin_ranking` existed (every saved SEA
    config holds `sea_budget_rule`) ranked bins by the estimate, or by the content ranking their `sea_baseline`
    named, and those saved before `sea_candidate_factor` existed re-ranked nothing: they keep that selection."""
    if "sea_bin_ranking" in config_dict or "sea_budget_rule" not in config_dict:
        return config_dict
    upgraded = {"sea_candidate_factor": 1, **config_dict, "sea_bin_ranking": "estimate"}
    if upgraded.get("sea_baseline") in SEA_BIN_RANKINGS:
        upgraded["sea_bin_ranking"], upgraded["sea_baseline"] = upgraded["sea_baseline"], None
    return upgraded


@dataclass(kw_only=True, repr=False)
class SeaConfigMixin:
    r"""
    SEA fields shared by every family. The ones that shape no weight (`sea_key_budget`, `sea_budget_rule`,
    `sea_bin_ranking`, `sea_candidate_factor`, `sea_anchor_bins`, `sea_query_block_size`, `sea_block_ranking`,
    `sea_group_selection`, `sea_kernel`, `sea_baseline`) are read at
    every call: changing them on a loaded model's config acts at once (and is what `save_pretrained` writes).

    sea_key_budget (`int`, defaults to 64):
        Keys each query may attend to, per head. With `sea_budget_rule="constant"` this is a hard cap that holds
        at any sequence length; a row with at most this many visible keys is attended exactly, and a forward whose
        keys (cached ones included) all fit in the budget ranks no bin at all.
    sea_compressed_width (`int`, defaults to 256):
        Width M of the estimated (compressed) attention row: every query's visible keys are split into M bins.
        Must be a multiple of 4 for causal models and of 2 for bidirectional ones.
    sea_performer_nb_factor (`float`, defaults to 8.0):
        The kernel attention uses `floor(head_dim * ln(head_dim) / sea_performer_nb_factor)` random features.
    sea_budget_rule (`str`, defaults to `"constant"`):
        `"constant"`: the best-ranked bins are taken whole until `sea_key_budget` keys are filled (the bin
        that overflows contributes its first keys), so a query never reads more than `sea_key_budget` keys.
        `"reference"`: `round(sea_key_budget * M / L)` bins are taken whole for a row of `L` visible keys, as in
        the reference implementation; a query then reads about `sea_key_budget` keys while `L <= sea_key_budget * M`
        and more beyond.
    sea_bin_ranking (`str`, defaults to `"key_summaries"`):
        How each query ranks its bins, from which `sea_candidate_factor` takes the candidates. Three score the bins
        by the keys' content at O(M D) per query: `"key_means"` by the query's score against each bin's mean key
        (MoBA's gate), `"key_bounds"` by Quest's upper bound of the query's score over each bin's keys (from their
        per-channel minima and maxima), and `"key_summaries"` by each bin's better place under those two.
        `"estimate"` ranks by SEA's estimated attention row (the learned decoder and CNN over the kernel
        attention), as in the paper. The default is what retrieves: at 1/8 of the keys, with 4x candidates
        re-ranked, it keeps 91-102% of the dense model's retrieval on SmolLM2-135M at 4k-8k tokens, where the
        estimate, even distilled, keeps no more than a sink + window (`benchmarks/results/retrieval_smollm2.md`).
    sea_candidate_factor (`int`, defaults to 4):
        With a factor c > 1, the bins holding the newest `sea_key_budget` keys and the best-ranked
        `c * sea_key_budget` keys besides are candidates, and each query keeps those of them that hold the most of
        its exact softmax attention over the candidates' keys (computed over those keys only, at up to c + 1 times
        the sparse attention's cost). The ranking finds the region, the exact scores of its keys decide; the local
        window among the candidates keeps at least the attention mass of a sink + window. 1 keeps the ranking as
        it is.
    sea_output_gates (`bool`, defaults to `True`):
        Learned per-query gates that scale the sparse attention and mix in an average context carrying
        information from keys outside the mask. They start neutral (scale 1, mix 0).
    sea_anchor_bins (`bool`, defaults to `True`):
        Every query also reads its first and its last bin, ranked ahead of the others, within the same key
        budget: the start of the sequence, where pretrained models park attention they do not need elsewhere
        ("attention sinks": the first token of a decoder, `[CLS]` of an encoder), and the end of the row (the
        newest keys for a causal model, `[SEP]` for an encoder). `False` ranks by `sea_bin_ranking` alone, as the
        reference implementation does (by its estimate).
    sea_query_block_size (`int`, defaults to 1):
        Consecutive queries that share one selection of keys: 1 (every query chooses its own keys, as in the paper)
        or 16, 32, 64, 128. Shared selections let the Triton kernel attend with matrix units (tensor cores), which
        long inputs need to beat dense FlashAttention. A causal block takes bins that its first query sees (so every
        query of the block sees all of them), ranked as `sea_block_ranking` says, and every query of the block also
        reads the keys after its first query's up to itself.
        Decoding with a cache starts a block at every new token (each one chooses its own keys), so with blocks > 1
        a cached generation may read slightly different keys than one forward over the same text.
    sea_block_ranking (`str`, defaults to `"first_row"`):
        How a causal query block (`sea_query_block_size` > 1) ranks its first query's bins. `"first_row"`: by the
        first query's ranking alone (the block's later queries are not ranked). `"window_max"`: the block-size
        queries up to the first one (the first and those before it, so the choice depends on no later token) each
        rank those same bins, each ranking read as shares of the query's attention (a softmax over the bins), and
        a bin ranks by its largest share in any of them: a bin one query needs is kept. Bidirectional blocks
        always sum their queries' rankings.
    sea_group_selection (`bool`, defaults to `False`):
        With grouped-query attention, the query heads that share a key/value head also share one selection of
        keys: a bin ranks by its largest share of attention in any head of the group (each head's ranking read as
        shares, a softmax over the bins; NSA shares its selection within a group the same way, by the sum). The
        selection is computed once per group, and at inference the Triton kernel reads each selected key once for
        all the group's heads. No effect without grouped heads.
    sea_kernel (`str`, defaults to `"auto"`):
        Which implementation computes the sparse attention: `"auto"` picks the Triton kernel on CUDA when it can
        run (else the PyTorch path, with one warning saying why: e.g. training with attention dropout, which only
        the PyTorch path applies), `"triton"` always uses it (an error when it cannot run), `"torch"` always uses
        the PyTorch reference path. With `"auto"` on CUDA or `"triton"`, causal layers
        that need no gradient also estimate with Triton kernels (head_dim 64, and 128 in half precision; other
        sizes and dtypes warn once and use the PyTorch estimate).
    sea_baseline (`str`, *optional*):
        `None` for SEA. The other values turn the model into a comparison baseline with the same weights and key
        budget: `"kernel_attention"` outputs the kernel (Performer) linear attention of the values instead of sparse
        attention; the others replace `sea_bin_ranking`: `"local_window"` ranks the most recent bins first (a
        sliding window); `"random_mask"` ranks bins at random (a random mask of the same sparsity); `"oracle"`
        ranks bins by the share of the layer's exact dense attention mass they hold (computed from its queries and
        keys at O(T^2) cost, in chunks of rows): the upper bound of any bin selector at this budget.
        `sea_anchor_bins` and `sea_candidate_factor` apply to these rankings as to SEA's (a local window with
        anchors and `sea_candidate_factor=1` is a "sink + window" attention).
    """

    sea_key_budget: int = 64
    sea_compressed_width: int = 256
    sea_performer_nb_factor: float = 8.0
    sea_budget_rule: str = "constant"
    sea_bin_ranking: str = "key_summaries"
    sea_candidate_factor: int = 4
    sea_output_gates: bool = True
    sea_anchor_bins: bool = True
    sea_query_block_size: int = 1
    sea_block_ranking: str = "first_row"
    sea_group_selection: bool = False
    sea_kernel: str = "auto"
    sea_baseline: str | None = None

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        return super().from_dict(with_bin_ranking(config_dict), **kwargs)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_sea_fields()
        # Every Auto class a user may load this model family with, not only the class that saved it.
        self.auto_map = {**self.sea_family.auto_map, **(getattr(self, "auto_map", None) or {})}

    @property
    def sea_family(self) -> "SeaFamily":
        """This config's record in `SEA_FAMILIES`, keyed by its `model_type`: the dense family's own (folders saved
        before SEA configs took it say "sea_" + it, which a config read from them keeps)."""
        return SEA_FAMILIES[self.model_type.removeprefix("sea_")]

    @property
    def sea_causal(self) -> bool:
        return self.sea_family.causal

    def validate(self):
        super().validate()
        self.validate_sea_fields()

    def validate_sea_fields(self):
        """Raise a `ValueError` naming the first SEA field whose value is outside its allowed range."""
        divisor = SEA_DECODER_WIDTH_DIVISOR[self.sea_causal]
        for name, rule in SEA_FIELD_RULES.items():
            value = getattr(self, name)
            if not rule.accepts(value, divisor):
                allowed = rule.allowed.format(divisor=divisor, config=type(self).__name__)
                raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
        if getattr(self, "head_dim", None) is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                f"({self.num_attention_heads}): SEA needs one integer head_dim."
            )


class SeaOptConfig(SeaConfigMixin, OPTConfig):
    r"""
    Configuration of [`SeaOptModel`] / [`SeaOptForCausalLM`]: an [`OPTConfig`] plus the SEA fields documented in
    [`SeaConfigMixin`]. Build one from a dense checkpoint with `conversion/convert.py`.

    Example:

    ```python
    >>> config = SeaOptConfig(sea_key_budget=64, sea_compressed_width=128)
    ```
    """


class SeaBertConfig(SeaConfigMixin, BertConfig):
    r"""
    Configuration of [`SeaBertModel`] / [`SeaBertForSequenceClassification`]: a [`BertConfig`] plus the SEA fields
    documented in [`SeaConfigMixin`].
    """

    def validate_sea_fields(self):
        super().validate_sea_fields()
        if self.is_decoder or self.add_cross_attention:
            raise ValueError("SeaBertConfig is an encoder: `is_decoder` and `add_cross_attention` must be False.")


class SeaRotaryConfigMixin(SeaConfigMixin):
    r"""
    SEA fields of the Llama-like families (RoPE, grouped-query attention: Llama, Qwen2, Qwen3, Mistral), documented
    in [`SeaConfigMixin`]. No SEA weight depends on `max_position_embeddings` (SEA's positional code is a fixed
    sinusoid of the token's rank): a larger value, with the RoPE scaling of `rope_parameters`, loads the same
    weights for a longer context. It is the longest input the model takes.

    A dense sliding attention window (`sliding_window`: Mistral's, or the `use_sliding_window` layers of Qwen2 and
    Qwen3) is ignored: every SEA query may read any earlier key, and its key budget already bounds what it reads.
    A budget covering every key therefore reproduces the dense model on inputs no longer than the window and
    differs beyond it; the field stays in the config (it describes the dense model), and a config whose window is
    shorter than its positions logs a warning saying so.
    """

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        window = self.dense_sliding_window()
        if window is not None:
            logger.warning_once(
                f"{type(self).__name__}: SEA ignores the dense model's sliding_window={window}: its queries may read "
                f"any earlier key (at most sea_key_budget of them), so it matches the dense model only on inputs of "
                f"at most {window} tokens."
            )

    def dense_sliding_window(self) -> int | None:
        """The dense model's sliding attention window when one of its layers has a window shorter than its
        positions, else None."""
        window = getattr(self, "sliding_window", None)
        layer_types = getattr(self, "layer_types", None)
        if window is None or window >= self.max_position_embeddings:
            return None
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        return window

    def validate_sea_fields(self):
        super().validate_sea_fields()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads}) for grouped-query attention."
            )


class SeaLlamaConfig(SeaRotaryConfigMixin, LlamaConfig):
    r"""
    Configuration of [`SeaLlamaModel`] / [`SeaLlamaForCausalLM`]: a [`LlamaConfig`] plus the SEA fields documented
    in [`SeaRotaryConfigMixin`].
    """


class SeaQwen2Config(SeaRotaryConfigMixin, Qwen2Config):
    r"""
    Configuration of [`SeaQwen2Model`] / [`SeaQwen2ForCausalLM`]: a [`Qwen2Config`] (biased query, key and value
    projections) plus the SEA fields documented in [`SeaRotaryConfigMixin`].
    """


class SeaQwen3Config(SeaRotaryConfigMixin, Qwen3Config):
    r"""
    Configuration of [`SeaQwen3Model`] / [`SeaQwen3ForCausalLM`]: a [`Qwen3Config`] (RMS-normalised query and key
    heads) plus the SEA fields documented in [`SeaRotaryConfigMixin`].
    """


class SeaMistralConfig(SeaRotaryConfigMixin, MistralConfig):
    r"""
    Configuration of [`SeaMistralModel`] / [`SeaMistralForCausalLM`]: a [`MistralConfig`] plus the SEA fields
    documented in [`SeaRotaryConfigMixin`] (which says what SEA does with Mistral's `sliding_window`).
    """


# The task a family converts to -> the Auto class its converted model loads with.
SEA_TASK_AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
}


@dataclass(frozen=True)
class SeaFamily:
    """One dense model family that SEA converts.

    config_class: the SEA config. Its `model_type` is the dense family's own (the key in `SEA_FAMILIES`), so that
        a saved model's `config.json` reads as the dense family's to code that does not run the remote code (stock
        `AutoTokenizer` and `AutoConfig` without `trust_remote_code`); its `auto_map` and its SEA fields are what
        make it a SEA model.
    task: a key of `SEA_TASK_AUTO_CLASSES`: the model conversion builds and distillation trains.
    sea_classes: Auto class -> name of the SEA class in `modeling_sea` that it loads (the config's `auto_map`).
    dense_class: the transformers class whose state dict the converted model's matches name for name (the
        family's other dense classes, such as a bare encoder, give their base model's weights).
    query_key_modules: the dense attention's submodules whose outputs are the per-head queries and keys its scores
        are computed from (before RoPE, for a family that has it): what the trainer rebuilds the teacher's
        attention from.
    lora_targets: the attention projections that LoRA adapts in distillation (`--train-parameters lora`).
    """

    config_class: type[SeaConfigMixin]
    task: str
    sea_classes: dict[str, str]
    dense_class: str
    query_key_modules: tuple[str, str]
    lora_targets: tuple[str, ...]

    @property
    def causal(self) -> bool:
        return self.task == "causal-lm"

    @property
    def auto_class(self) -> str:
        """The Auto class of the model conversion builds."""
        return SEA_TASK_AUTO_CLASSES[self.task]

    @property
    def auto_map(self) -> dict[str, str]:
        return {
            "AutoConfig": f"configuration_sea.{self.config_class.__name__}",
            **{auto_class: f"modeling_sea.{name}" for auto_class, name in self.sea_classes.items()},
        }


def rotary_causal_lm(
    config_class: type[SeaRotaryConfigMixin], dense_class: str, query_key_modules: tuple[str, str] = ("q_proj", "k_proj")
) -> SeaFamily:
    """The record of a Llama-like causal LM family: SEA classes named after its config (`SeaQwen2Config` ->
    `SeaQwen2Model`, `SeaQwen2ForCausalLM`) and Llama's attention projections `q_proj`/`k_proj`/`v_proj`/`o_proj`."""
    prefix = config_class.__name__.removesuffix("Config")
    return SeaFamily(
        config_class, "causal-lm", {"AutoModel": f"{prefix}Model", "AutoModelForCausalLM": f"{prefix}ForCausalLM"},
        dense_class, query_key_modules, ("q_proj", "k_proj", "v_proj", "o_proj"),
    )


# model_type of the dense checkpoints -> their family.
SEA_FAMILIES = {
    "opt": SeaFamily(
        SeaOptConfig, "causal-lm", {"AutoModel": "SeaOptModel", "AutoModelForCausalLM": "SeaOptForCausalLM"},
        "OPTForCausalLM", ("q_proj", "k_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
    ),
    "llama": rotary_causal_lm(SeaLlamaConfig, "LlamaForCausalLM"),
    "bert": SeaFamily(
        SeaBertConfig, "sequence-classification",
        {"AutoModel": "SeaBertModel", "AutoModelForSequenceClassification": "SeaBertForSequenceClassification",
         "AutoModelForMaskedLM": "SeaBertForMaskedLM"},
        "BertForSequenceClassification", ("query", "key"), ("query", "key", "value"),
    ),
    "qwen2": rotary_causal_lm(SeaQwen2Config, "Qwen2ForCausalLM"),
    # Qwen3 RMS-normalises each query and key head after projecting it: its scores read the norms' outputs.
    "qwen3": rotary_causal_lm(SeaQwen3Config, "Qwen3ForCausalLM", query_key_modules=("q_norm", "k_norm")),
    "mistral": rotary_causal_lm(SeaMistralConfig, "MistralForCausalLM"),
}


__all__ = ["SeaOptConfig", "SeaBertConfig", "SeaLlamaConfig", "SeaQwen2Config", "SeaQwen3Config", "SeaMistralConfig"]
