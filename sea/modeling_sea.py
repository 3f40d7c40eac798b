"""SEA model families: OPT and BERT with SEA replacing self-attention.

The classes are thin over transformers' own OPT and BERT: embeddings, feed-forward blocks, heads and their
`forward`s are the library's; only self-attention is swapped for one that projects q/k/v with the pretrained
weights and runs `SeaAttention`. Attention masks stay (N, T) padding masks all the way down (SEA derives
causality itself), so no T x T mask is ever built.
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.bert.modeling_bert import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    BertPreTrainedModel,
    BertSelfAttention,
)
from transformers.models.opt.modeling_opt import (
    OPTAttention,
    OPTDecoder,
    OPTForCausalLM,
    OPTModel,
    OPTPreTrainedModel,
)
from transformers.utils.output_capturing import capture_outputs

from .configuration_sea import SeaBertConfig, SeaOptConfig
from .sea_attention import SeaAttention, orthogonal_gaussian_features


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


class SeaPreTrainedMixin:
    """Weight init of the SEA parameters, shared by both families (mixed into each family's PreTrainedModel)."""

    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SeaAttention):
            init.copy_(module.feature_projection, orthogonal_gaussian_features(*module.feature_projection.shape))
            if module.position_table is not None:
                init.normal_(module.position_table, std=1.0)
            if module.gates is not None:  # neutral start: sparse scale 1, no average mixed in
                init.zeros_(module.gates.weight)
                init.zeros_(module.gates.bias)


# ----------------------------------------------------------------------------------------------------------- OPT


class SeaOptAttention(OPTAttention):
    """OPT self-attention with the pretrained projections and SEA in place of dense softmax attention."""

    def __init__(self, config: SeaOptConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.sea = SeaAttention(config, self.num_heads, self.head_dim, causal=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ):
        n, t, _ = hidden_states.shape
        shape = (n, t, self.num_heads, self.head_dim)
        # OPT scales queries before the product; SEA then uses a scaling of 1, like OPT's own attention call.
        query = (self.q_proj(hidden_states) * self.scaling).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        result = self.sea(query, key, value, attention_mask, scaling=1.0)
        output = self.out_proj(heads_to_hidden(result.context))
        return output, result.dense_probs(t) if output_attentions else None


class SeaOptPreTrainedModel(SeaPreTrainedMixin, OPTPreTrainedModel):
    config_class = SeaOptConfig
    config: SeaOptConfig
    _can_record_outputs = {"hidden_states": OPTPreTrainedModel._can_record_outputs["hidden_states"], "attentions": SeaOptAttention}


class SeaOptDecoder(SeaOptPreTrainedModel, OPTDecoder):
    """OPT's decoder with SEA self-attention. Its forward passes the (N, T) padding mask to every layer."""

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
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise NotImplementedError(
                "SeaOptModel cannot continue from a KV cache yet; run the full sequence, or "
                "`generate(..., use_cache=False)`."
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        n, t = inputs_embeds.shape[:2]
        if t > self.config.max_position_embeddings:
            raise ValueError(
                f"Sequence length {t} exceeds max_position_embeddings={self.config.max_position_embeddings} of this "
                "OPT model (learned positions); truncate the input."
            )
        key_valid = padding_mask_to_key_valid(attention_mask, n, t)
        mask = torch.ones(n, t, dtype=torch.long, device=inputs_embeds.device) if key_valid is None else key_valid.long()
        pos_embeds = self.embed_positions(mask, 0, position_ids=position_ids)
        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)
        hidden_states = inputs_embeds + pos_embeds.to(inputs_embeds.device)
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            hidden_states = layer(hidden_states, attention_mask=key_valid, position_ids=position_ids, **kwargs)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states)


class SeaOptModel(SeaOptPreTrainedModel, OPTModel):
    def __init__(self, config: SeaOptConfig):
        super().__init__(config)
        self.decoder = SeaOptDecoder(config)
        self.post_init()


class SeaOptForCausalLM(SeaOptPreTrainedModel, OPTForCausalLM):
    """`OPTForCausalLM` with SEA attention: same forward, outputs, loss and generation API."""

    def __init__(self, config: SeaOptConfig):
        super().__init__(config)
        self.model = SeaOptModel(config)
        self.post_init()


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
        result = self.sea(query, key, value, attention_mask, scaling=self.scaling)
        probs = result.dense_probs(t) if kwargs.get("output_attentions") else None
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


SeaOptConfig.register_for_auto_class()
SeaBertConfig.register_for_auto_class()
SeaOptModel.register_for_auto_class("AutoModel")
SeaOptForCausalLM.register_for_auto_class("AutoModelForCausalLM")
SeaBertModel.register_for_auto_class("AutoModel")
SeaBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
SeaBertForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")

__all__ = [
    "SeaOptModel",
    "SeaOptForCausalLM",
    "SeaOptPreTrainedModel",
    "SeaBertModel",
    "SeaBertForSequenceClassification",
    "SeaBertForMaskedLM",
    "SeaBertPreTrainedModel",
]
