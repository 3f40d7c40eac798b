"""SEA models: every family of `SEA_FAMILIES` (OPT, Llama, Qwen2, Qwen3, Mistral, BERT) with SEA replacing
self-attention.

The classes are thin over transformers' own: embeddings, feed-forward blocks, heads and their `forward`s are the
library's; only self-attention is swapped for one that projects q/k/v with the pretrained weights (and applies RoPE,
for the Llama-like families, which share one attention and one decoder forward) and runs `SeaAttention`. Attention masks stay (N, T) padding masks all the way down (SEA derives
causality itself), so no T x T mask is ever built.
"""

import copy

import torch
import torch.nn.functional as F
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.bert.modeling_bert import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    BertPreTrainedModel,
    BertSelfAttention,
)
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    apply_rotary_pos_emb,
)
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralDecoderLayer,
    MistralForCausalLM,
    MistralModel,
    MistralPreTrainedModel,
)
from transformers.models.opt.modeling_opt import (
    OPTAttention,
    OPTDecoder,
    OPTForCausalLM,
    OPTModel,
    OPTPreTrainedModel,
)
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen2PreTrainedModel,
)
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention,
    Qwen3DecoderLayer,
    Qwen3ForCausalLM,
    Qwen3Model,
    Qwen3PreTrainedModel,
)
from transformers.utils import is_torchdynamo_compiling, logging
from transformers.utils.output_capturing import capture_outputs

from .configuration_sea import (
    SEA_FAMILIES,
    SeaBertConfig,
    SeaConfigMixin,
    SeaFamily,
    SeaLlamaConfig,
    SeaMistralConfig,
    SeaOptConfig,
    SeaQwen2Config,
    SeaQwen3Config,
    SeaRotaryConfigMixin,
)
from .sea_cache import SeaCache, SeaCacheMixin, SeaStaticCache
from .sea_layer import SeaAttention

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (the old name stays,
# deprecated, until 5.40). The library's layers are called, and outputs built, with the installed release's name;
# SEA's own forwards take either.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def given_cache(cache, past_key_values):
    """The cache a forward was handed, as `cache` (transformers >= 5.24) or `past_key_values` (earlier)."""
    return past_key_values if cache is None else cache


def padding_mask_to_key_valid(attention_mask: torch.Tensor | None, batch_size: int, length: int):
    """The usual (N, T) attention mask (1 = token, 0 = padding) as a boolean key-validity mask."""
    if attention_mask is None:
        return None
    if attention_mask.shape != (batch_size, length):
        raise ValueError(
            f"SEA models take a 2-D `attention_mask` of shape (batch, sequence) = {(batch_size, length)} with 1 for "
            f"tokens and 0 for padding; got shape {tuple(attention_mask.shape)}. Causality is applied internally."
        )
    return attention_mask.bool()


def heads_to_hidden(context: torch.Tensor) -> torch.Tensor:
    """(N, H, T, D) -> (N, T, H * D)."""
    n, h, t, d = context.shape
    return context.transpose(1, 2).reshape(n, t, h * d)


def prepare_causal_inputs(decoder, input_ids, inputs_embeds, attention_mask, given, use_cache):
    """What a causal SEA decoder starts from: the input embeddings, the `SeaCache` to continue (None without
    caching), the number of cached positions, and the (N, T_all) key-validity mask of every position so far (also
    stored in the cache, so a decode step without `attention_mask` keeps the prompt's padding). The mask is None
    when no position can be padding (no `attention_mask`, nothing cached): the layers then skip every padding
    step, and nothing waits on its values (which `torch.export` could not trace). It is None too when it marks no
    padding (generate's all-ones masks), checked here once per forward instead of in every layer: the check waits
    for the device; a traced graph (torch.export, torch.compile) skips it and passes the mask on."""
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = decoder.embed_tokens(input_ids)
    config = decoder.config
    n, t = inputs_embeds.shape[:2]
    if t == 0:
        raise ValueError("The input is empty: SEA models need at least one token.")
    # torch 2.11 also reports exporting inside torch.compile's traces, where a static cache is what compiled
    # generation continues: only a forward without one is taken for an export.
    if torch.compiler.is_exporting() and not isinstance(given, SeaStaticCache):
        # An exported program's outputs are tensors (or registered containers): SEA's cache is neither.
        if use_cache or given is not None:
            raise ValueError(
                "SEA models export without a cache: a SeaCache cannot be an input or output of an exported "
                "program. Export with `use_cache=False` and no `cache`/`past_key_values`, and generate eagerly."
            )
        use_cache = False
    use_cache = config.use_cache if use_cache is None else use_cache
    if decoder.training and any(layer.gradient_checkpointing for layer in decoder.layers):
        # transformers' checkpointed layers drop the cache (a replayed layer would write it twice; 5.17 drops it
        # even without gradients): the forward runs without one, and a filled cache cannot be continued.
        if given is not None and given.get_seq_length() > 0:
            raise ValueError(
                "A SEA model in training mode with gradient checkpointing cannot continue a cache: its layers drop "
                "it. Call model.eval() (or model.gradient_checkpointing_disable()) to decode, or train on whole "
                "sequences."
            )
        given, use_cache = None, False
    cache = SeaCacheMixin.for_model(given, config) if use_cache or given is not None else None
    past = cache.get_seq_length() if cache is not None else 0  # a static cache's: a tensor, so no step recompiles
    if not is_torchdynamo_compiling():
        check_length(int(past) + t, config, cache)
    if isinstance(cache, SeaStaticCache):
        new_slots = cache.begin_forward(n, t, inputs_embeds.device)
        return inputs_embeds, cache, past, static_key_valid(cache, attention_mask, new_slots)
    new_valid = torch.ones(n, t, dtype=torch.bool, device=inputs_embeds.device)
    key_valid = None
    if attention_mask is not None:
        key_valid = padding_mask_to_key_valid(attention_mask, n, past + t)
    elif past:
        key_valid = torch.cat([cache.key_valid, new_valid], dim=1)
    if cache is not None:
        cache.key_valid = new_valid if key_valid is None else key_valid
    if key_valid is not None and not is_torchdynamo_compiling() and bool(key_valid.all()):
        key_valid = None
    return inputs_embeds, cache, past, key_valid


def check_length(total: int, config, cache) -> None:
    """Refuses a forward whose positions so far exceed the model's, or the static cache's slots."""
    if total > config.max_position_embeddings:
        raise ValueError(
            f"{total} tokens exceed max_position_embeddings={config.max_position_embeddings} of this model; "
            "truncate the input or generate fewer tokens."
        )
    if isinstance(cache, SeaStaticCache) and total > cache.max_cache_len:
        raise ValueError(
            f"{total} tokens exceed this SeaStaticCache's max_cache_len={cache.max_cache_len}; make a larger cache "
            "(generate sizes it by max_length, or by generation_config.max_cache_len)."
        )


def static_key_valid(cache: SeaStaticCache, attention_mask: torch.Tensor | None, new_slots: torch.Tensor):
    """The key mask of a static cache's slots once this forward's positions are in: the given mask of every
    position so far, (N, max_cache_len) as generate() pads it or (N, positions so far), else the cache's own with
    the new slots valid. Unfilled slots are invalid, which is how SEA's layers tell them from keys. Kept in the
    cache, in place, so a step without `attention_mask` keeps the prompt's padding."""
    buffer = cache.key_valid
    if attention_mask is None:
        return buffer.index_fill_(1, new_slots, True)
    n, slots = buffer.shape
    if attention_mask.shape != (n, slots):
        filled = None if is_torchdynamo_compiling() else int(new_slots[-1]) + 1
        if attention_mask.shape != (n, filled):
            raise ValueError(
                f"A SEA model continuing a SeaStaticCache takes a 2-D `attention_mask` of shape (batch, max_cache_len) "
                f"= {(n, slots)}, or eagerly (batch, positions so far) = {(n, filled)}, with 1 for tokens and 0 for "
                f"padding; got shape {tuple(attention_mask.shape)}."
            )
        attention_mask = F.pad(attention_mask, (0, slots - filled))
    filled_slots = torch.arange(slots, device=buffer.device) <= new_slots[-1]
    return buffer.copy_(attention_mask.bool() & filled_slots)


def wants_attentions(attention: torch.nn.Module, requested: bool | None) -> bool:
    """Whether an attention layer returns its probabilities: the call's `output_attentions`, else its config's
    (transformers' output capturing passes only an explicit request down to the layers)."""
    return bool(attention.config.output_attentions if requested is None else requested)


class SeaPreTrainedMixin:
    """Weight init of the SEA parameters, shared by every family (mixed into each family's PreTrainedModel)."""

    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    def __init__(self, config, *args, **kwargs):
        # The dense parent's constructor builds its own submodules, whose `post_init` consumes the legacy
        # `gradient_checkpointing: true` config flag (transformers deletes it once honoured) before the SEA
        # submodules replace them: put it back, so this model's own `post_init` honours it on the SEA modules.
        legacy_checkpointing = getattr(config, "gradient_checkpointing", False)
        super().__init__(config, *args, **kwargs)
        if legacy_checkpointing:
            config.gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SeaAttention):
            module.init_sea_weights()


# ----------------------------------------------------------------------------------------------------------- OPT


class SeaOptAttention(OPTAttention):
    """OPT self-attention with the pretrained projections and SEA in place of dense softmax attention."""

    def __init__(self, config: SeaOptConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.sea = SeaAttention(config, self.num_heads, self.head_dim, causal=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: SeaCache | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        past_key_values: SeaCache | None = None,
        **kwargs,
    ):
        cache = given_cache(cache, past_key_values)
        output_attentions = wants_attentions(self, output_attentions)
        n, t, _ = hidden_states.shape
        shape = (n, t, self.num_heads, self.head_dim)
        # OPT scales queries before the product; SEA then uses a scaling of 1, like OPT's own attention call.
        query = (self.q_proj(hidden_states) * self.scaling).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        state = new_slots = None
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
            state, new_slots = cache.sea_state(self.layer_idx), cache.new_slots
        result = self.sea(query, key, value, attention_mask, scaling=1.0, state=state, need_probs=output_attentions,
                          dropout=self.dropout if self.training else 0.0, new_slots=new_slots)
        if cache is not None:
            cache.set_sea_state(self.layer_idx, result.state)
        output = self.out_proj(heads_to_hidden(result.context))
        return output, result.dense_probs(key.shape[2]) if output_attentions else None


class SeaOptPreTrainedModel(SeaPreTrainedMixin, OPTPreTrainedModel):
    config_class = SeaOptConfig
    config: SeaOptConfig
    _can_record_outputs = {"hidden_states": OPTPreTrainedModel._can_record_outputs["hidden_states"], "attentions": SeaOptAttention}


class SeaOptDecoder(SeaOptPreTrainedModel, OPTDecoder):
    """OPT's decoder with SEA self-attention. Every layer gets the (N, T_all) padding mask of all positions so far
    and, when caching, a `SeaCache`."""

    def __init__(self, config: SeaOptConfig):
        super().__init__(config)
        for index, layer in enumerate(self.layers):
            layer.self_attn = SeaOptAttention(config, layer_idx=index)
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: SeaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: SeaCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        inputs_embeds, cache, past, key_valid = prepare_causal_inputs(
            self, input_ids, inputs_embeds, attention_mask, given_cache(cache, past_key_values), use_cache
        )
        t = inputs_embeds.shape[1]
        if position_ids is None and key_valid is None:
            position_ids = (torch.arange(t, device=inputs_embeds.device) + past)[None]
        elif position_ids is None:  # OPT's rule: positions count the tokens, not the padding
            mask = key_valid.long()
            token_positions = mask.cumsum(-1) * mask - 1
            new_slots = cache.new_slots if cache is not None else None
            position_ids = token_positions[:, -t:] if new_slots is None else token_positions.index_select(1, new_slots)
        pos_embeds = self.embed_positions(None, past, position_ids=position_ids)
        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)
        hidden_states = inputs_embeds + pos_embeds.to(inputs_embeds.device)
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            hidden_states = layer(
                hidden_states, attention_mask=key_valid, position_ids=position_ids, **{CACHE_NAME: cache}, **kwargs
            )
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: cache})


class SeaOptModel(SeaOptPreTrainedModel, OPTModel):
    def __init__(self, config: SeaOptConfig):
        super().__init__(config)
        self.decoder = SeaOptDecoder(config)
        self.post_init()


class SeaCausalLMMixin:
    """A causal SEA family's LM: the dense LM class over the family's SEA decoder (`sea_model_class`); generate()
    starts every cached generation with a fresh `SeaCache`, and a request longer than the model's positions fails
    before any work."""

    sea_model_class: type

    def __init__(self, config: SeaConfigMixin):
        super().__init__(config)
        self.model = self.sea_model_class(config)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # No plain DynamicCache, static, offloaded or quantized cache can hold SEA's state.
        return False

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        """A fresh SEA cache when the user gave no cache and caching is on (chunked prefill needs one before the
        first forward): a `SeaStaticCache` of `max_cache_length` slots (or `generation_config.max_cache_len`, when
        larger) for `cache_implementation="static"`, a `SeaCache` otherwise; with a user's cache, transformers'
        checks of it."""
        given = given_cache(model_kwargs.get("cache"), model_kwargs.get("past_key_values"))
        if given is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        implementation = generation_config.cache_implementation
        if implementation == "static":
            slots = max(max_cache_length, getattr(generation_config, "max_cache_len", None) or 0)
            model_kwargs[CACHE_NAME] = SeaStaticCache(self.config, slots)
            return
        if implementation not in (None, "dynamic"):
            logger.warning_once(
                f"SEA models generate with their own SeaCache or, for cache_implementation='static', SeaStaticCache: "
                f"cache_implementation={implementation!r} is ignored."
            )
        model_kwargs[CACHE_NAME] = SeaCache(self.config)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, **kwargs):
        """What generate() passes as `attention_mask` with a compilable cache: for a `SeaStaticCache`, the 2-D
        padding mask padded with zeros to the cache's slots, a shape that stays the same at every step (SEA layers
        read (N, T) padding masks, never 4-D ones)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if attention_mask is None or not isinstance(cache, SeaStaticCache):
            return attention_mask
        return F.pad(attention_mask, (0, cache.max_cache_len - attention_mask.shape[1]))

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """`GenerationMixin.generate`, after checking that the prompt plus the new tokens fit the model's
        `max_position_embeddings` and that no mode rolls the cache back, so a bad request fails before any work."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        config = generation_config or self.generation_config
        new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        if prompt is not None and prompt.shape[1] == 0:
            raise ValueError("The prompt is empty: SEA models need at least one token to generate from.")
        total = kwargs.get("max_length", config.max_length) if new_tokens is None else None
        if prompt is not None and new_tokens is not None:
            total = prompt.shape[1] + new_tokens
        requested = copy.deepcopy(config)
        requested.update(**kwargs)
        requested.update(**self.generation_config.to_dict(), defaults_only=True)  # as generate() completes it
        if requested.get_generation_mode(kwargs.get("assistant_model")) == GenerationMode.ASSISTED_GENERATION:
            raise ValueError(
                "SEA models do not support assisted or speculative decoding (`assistant_model`, prompt lookup, "
                "early exit): they roll the cache back, and SEA's kernel-attention prefix sums cannot drop tokens."
            )
        if total is not None and total > self.config.max_position_embeddings:
            raise ValueError(
                f"Generating up to {total} tokens exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings} of this model: "
                "shorten the prompt or lower `max_new_tokens`."
            )
        return super().generate(inputs, generation_config, **kwargs)


class SeaOptForCausalLM(SeaCausalLMMixin, SeaOptPreTrainedModel, OPTForCausalLM):
    """`OPTForCausalLM` with SEA attention: same forward, outputs, loss and generation API. Cached generation
    uses a `SeaCache`, which the first forward creates."""

    sea_model_class = SeaOptModel


# ------------------------------------------------------------------------------- Llama, Qwen2, Qwen3, Mistral


class SeaRotaryAttentionMixin:
    """Self-attention of the Llama-like families with SEA in place of dense attention, mixed in ahead of the
    family's own attention class, whose constructor makes the pretrained projections (with the family's biases and
    norms). Keys and values keep their `num_key_value_heads` heads, in the cache and in SEA (grouped-query
    attention). A dense sliding window is not applied (see `SeaRotaryConfigMixin`)."""

    def __init__(self, config: SeaRotaryConfigMixin, layer_idx: int):
        super().__init__(config, layer_idx)
        self.sea = SeaAttention(
            config, config.num_attention_heads, self.head_dim, causal=True, num_key_value_heads=config.num_key_value_heads
        )

    def queries_keys(self, hidden_states: torch.Tensor, hidden_shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries (N, T, H, D) and keys (N, T, H_kv, D) before RoPE: Llama's plain projections."""
        return self.q_proj(hidden_states).view(hidden_shape), self.k_proj(hidden_states).view(hidden_shape)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: SeaCache | None = None,
        past_key_values: SeaCache | None = None,
        **kwargs,
    ):
        cache = given_cache(cache, past_key_values)
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query, key = (states.transpose(1, 2) for states in self.queries_keys(hidden_states, hidden_shape))
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        # Rotated queries and keys feed both the estimate and the exact scores, as they feed dense attention.
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        state = new_slots = None
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
            state, new_slots = cache.sea_state(self.layer_idx), cache.new_slots
        output_attentions = wants_attentions(self, kwargs.get("output_attentions"))
        result = self.sea(query, key, value, attention_mask, scaling=self.scaling, state=state, need_probs=output_attentions,
                          dropout=self.attention_dropout if self.training else 0.0, new_slots=new_slots)
        if cache is not None:
            cache.set_sea_state(self.layer_idx, result.state)
        output = self.o_proj(heads_to_hidden(result.context))
        return output, result.dense_probs(key.shape[2]) if output_attentions else None


class SeaRotaryModelMixin:
    """The decoder of a Llama-like family (`LlamaModel`, `Qwen2Model`, ...) with the family's SEA attention
    (`sea_attention_class`) in every layer. Layers get the (N, T_all) padding mask instead of a 4-D causal mask,
    and a `SeaCache` when caching."""

    sea_attention_class: type[SeaRotaryAttentionMixin]

    def __init__(self, config: SeaRotaryConfigMixin):
        super().__init__(config)
        for index, layer in enumerate(self.layers):
            layer.self_attn = self.sea_attention_class(config, layer_idx=index)
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SeaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: SeaCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        inputs_embeds, cache, past, key_valid = prepare_causal_inputs(
            self, input_ids, inputs_embeds, attention_mask, given_cache(cache, past_key_values), use_cache
        )
        if position_ids is None:  # Llama's rule: positions count every slot, padding included
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(
                hidden_states, attention_mask=key_valid, position_embeddings=position_embeddings,
                position_ids=position_ids, use_cache=use_cache, **{CACHE_NAME: cache}, **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE_NAME: cache})


class SeaLlamaAttention(SeaRotaryAttentionMixin, LlamaAttention):
    """Llama's self-attention with SEA."""


class SeaLlamaPreTrainedModel(SeaPreTrainedMixin, LlamaPreTrainedModel):
    config_class = SeaLlamaConfig
    config: SeaLlamaConfig
    _can_record_outputs = {"hidden_states": LlamaDecoderLayer, "attentions": SeaLlamaAttention}


class SeaLlamaModel(SeaRotaryModelMixin, SeaLlamaPreTrainedModel, LlamaModel):
    """`LlamaModel` with SEA self-attention."""

    sea_attention_class = SeaLlamaAttention


class SeaLlamaForCausalLM(SeaCausalLMMixin, SeaLlamaPreTrainedModel, LlamaForCausalLM):
    """`LlamaForCausalLM` with SEA attention: same forward, outputs, loss and generation API."""

    sea_model_class = SeaLlamaModel


class SeaQwen2Attention(SeaRotaryAttentionMixin, Qwen2Attention):
    """Qwen2's self-attention with SEA (`Qwen2Attention` gives the query, key and value projections their biases)."""


class SeaQwen2PreTrainedModel(SeaPreTrainedMixin, Qwen2PreTrainedModel):
    config_class = SeaQwen2Config
    config: SeaQwen2Config
    _can_record_outputs = {"hidden_states": Qwen2DecoderLayer, "attentions": SeaQwen2Attention}


class SeaQwen2Model(SeaRotaryModelMixin, SeaQwen2PreTrainedModel, Qwen2Model):
    """`Qwen2Model` with SEA self-attention."""

    sea_attention_class = SeaQwen2Attention


class SeaQwen2ForCausalLM(SeaCausalLMMixin, SeaQwen2PreTrainedModel, Qwen2ForCausalLM):
    """`Qwen2ForCausalLM` with SEA attention: same forward, outputs, loss and generation API."""

    sea_model_class = SeaQwen2Model


class SeaQwen3Attention(SeaRotaryAttentionMixin, Qwen3Attention):
    """Qwen3's self-attention with SEA."""

    def queries_keys(self, hidden_states: torch.Tensor, hidden_shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        # Qwen3 RMS-normalises every query and key head before RoPE, as its dense attention does.
        query, key = super().queries_keys(hidden_states, hidden_shape)
        return self.q_norm(query), self.k_norm(key)


class SeaQwen3PreTrainedModel(SeaPreTrainedMixin, Qwen3PreTrainedModel):
    config_class = SeaQwen3Config
    config: SeaQwen3Config
    _can_record_outputs = {"hidden_states": Qwen3DecoderLayer, "attentions": SeaQwen3Attention}


class SeaQwen3Model(SeaRotaryModelMixin, SeaQwen3PreTrainedModel, Qwen3Model):
    """`Qwen3Model` with SEA self-attention."""

    sea_attention_class = SeaQwen3Attention


class SeaQwen3ForCausalLM(SeaCausalLMMixin, SeaQwen3PreTrainedModel, Qwen3ForCausalLM):
    """`Qwen3ForCausalLM` with SEA attention: same forward, outputs, loss and generation API."""

    sea_model_class = SeaQwen3Model


class SeaMistralAttention(SeaRotaryAttentionMixin, MistralAttention):
    """Mistral's self-attention with SEA; its `sliding_window` is not applied (see `SeaRotaryConfigMixin`)."""


class SeaMistralPreTrainedModel(SeaPreTrainedMixin, MistralPreTrainedModel):
    config_class = SeaMistralConfig
    config: SeaMistralConfig
    _can_record_outputs = {"hidden_states": MistralDecoderLayer, "attentions": SeaMistralAttention}


class SeaMistralModel(SeaRotaryModelMixin, SeaMistralPreTrainedModel, MistralModel):
    """`MistralModel` with SEA self-attention."""

    sea_attention_class = SeaMistralAttention


class SeaMistralForCausalLM(SeaCausalLMMixin, SeaMistralPreTrainedModel, MistralForCausalLM):
    """`MistralForCausalLM` with SEA attention: same forward, outputs, loss and generation API."""

    sea_model_class = SeaMistralModel


# ---------------------------------------------------------------------------------------------------------- BERT


class SeaBertSelfAttention(BertSelfAttention):
    """BERT self-attention with the pretrained projections and bidirectional SEA."""

    def __init__(self, config: SeaBertConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.sea = SeaAttention(config, self.num_attention_heads, self.attention_head_size, causal=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        n, t, _ = hidden_states.shape
        shape = (n, t, self.num_attention_heads, self.attention_head_size)
        query = self.query(hidden_states).view(shape).transpose(1, 2)
        key = self.key(hidden_states).view(shape).transpose(1, 2)
        value = self.value(hidden_states).view(shape).transpose(1, 2)
        output_attentions = wants_attentions(self, kwargs.get("output_attentions"))
        result = self.sea(query, key, value, attention_mask, scaling=self.scaling, need_probs=output_attentions,
                          dropout=self.dropout.p if self.training else 0.0)
        probs = result.dense_probs(t) if output_attentions else None
        return heads_to_hidden(result.context), probs


class SeaBertPreTrainedModel(SeaPreTrainedMixin, BertPreTrainedModel):
    config_class = SeaBertConfig
    config: SeaBertConfig
    _can_record_outputs = {"hidden_states": BertPreTrainedModel._can_record_outputs["hidden_states"], "attentions": SeaBertSelfAttention}


class SeaBertModel(SeaBertPreTrainedModel, BertModel):
    """`BertModel` (encoder only) with SEA self-attention."""

    def __init__(self, config: SeaBertConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        for index, layer in enumerate(self.encoder.layer):
            layer.attention.self = SeaBertSelfAttention(config, layer_idx=index)
        self.post_init()

    def _create_attention_masks(self, attention_mask, encoder_attention_mask, embedding_output, **kwargs):
        # SEA reads the (N, T) padding mask directly instead of an expanded 4-D mask.
        n, t = embedding_output.shape[:2]
        return padding_mask_to_key_valid(attention_mask, n, t), None


class SeaBertForSequenceClassification(SeaBertPreTrainedModel, BertForSequenceClassification):
    def __init__(self, config: SeaBertConfig):
        super().__init__(config)
        self.bert = SeaBertModel(config)
        self.post_init()


class SeaBertForMaskedLM(SeaBertPreTrainedModel, BertForMaskedLM):
    def __init__(self, config: SeaBertConfig):
        super().__init__(config)
        self.bert = SeaBertModel(config, add_pooling_layer=False)
        self.post_init()


def converted_class(family: SeaFamily) -> type:
    """The SEA class that conversion builds for `family`: the one its task's Auto class loads."""
    return globals()[family.sea_classes[family.auto_class]]


# Each class saves with the `auto_map` entry (and the bundle's code) of every Auto class its family loads with.
for family in SEA_FAMILIES.values():
    family.config_class.register_for_auto_class()
    for auto_class, name in family.sea_classes.items():
        globals()[name].register_for_auto_class(auto_class)

__all__ = [
    "SeaOptModel",
    "SeaOptForCausalLM",
    "SeaOptPreTrainedModel",
    "SeaLlamaModel",
    "SeaLlamaForCausalLM",
    "SeaLlamaPreTrainedModel",
    "SeaQwen2Model",
    "SeaQwen2ForCausalLM",
    "SeaQwen2PreTrainedModel",
    "SeaQwen3Model",
    "SeaQwen3ForCausalLM",
    "SeaQwen3PreTrainedModel",
    "SeaMistralModel",
    "SeaMistralForCausalLM",
    "SeaMistralPreTrainedModel",
    "SeaBertModel",
    "SeaBertForSequenceClassification",
    "SeaBertForMaskedLM",
    "SeaBertPreTrainedModel",
]
