"""The KV cache of causal SEA models.

A `DynamicCache` (keys and values per layer, so everything in transformers that reads or reorders a cache keeps
working) that also holds each layer's `SeaCausalState` and the padding mask of every position so far. With them a
decode step reads only the new token's selected keys, not the whole prefix.
"""

import torch
from transformers import DynamicCache

from .sea_attention import SeaCausalState


def model_signature(config) -> tuple:
    """What a cache must agree on with the model that continues it."""
    return (
        config.model_type, config.num_hidden_layers, config.num_attention_heads, config.hidden_size,
        config.sea_compressed_width, config.sea_performer_nb_factor,
    )


class SeaCache(DynamicCache):
    """Keys/values like `DynamicCache`, plus SEA's per-layer causal state and the key padding mask."""

    def __init__(self, config):
        super().__init__()
        self.signature = model_signature(config)
        self.sea_states: dict[int, SeaCausalState] = {}
        self.key_valid: torch.Tensor | None = None  # (N, T_cached) bool

    @classmethod
    def for_model(cls, past_key_values, config) -> "SeaCache":
        """The cache a SEA forward should continue: `past_key_values` itself when it is a SeaCache of this model,
        a new SeaCache in place of an empty cache, and a clear error for anything else."""
        if isinstance(past_key_values, SeaCache):
            if past_key_values.signature != model_signature(config):
                raise ValueError(
                    f"This SeaCache was built by a different model ({past_key_values.signature}); this model is "
                    f"{model_signature(config)}. Start generation without `past_key_values`."
                )
            return past_key_values
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            return cls(config)
        raise ValueError(
            f"A SEA model cannot continue a filled {type(past_key_values).__name__}: it needs SEA's own state beside "
            "the keys and values. Pass no `past_key_values` (generate() makes a SeaCache) or one the model returned."
        )

    def sea_state(self, layer_idx: int) -> SeaCausalState | None:
        return self.sea_states.get(layer_idx)

    def set_sea_state(self, layer_idx: int, state: SeaCausalState) -> None:
        self.sea_states[layer_idx] = state

    def _map_batch(self, fn) -> None:
        self.sea_states = {i: state.map(fn) for i, state in self.sea_states.items()}
        if self.key_valid is not None:
            self.key_valid = fn(self.key_valid)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_batch(lambda t: t[indices])

    def crop(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "A SeaCache cannot be cropped: SEA's kernel-attention prefix sums cannot drop tokens. Decoding modes "
            "that roll the cache back (assisted / speculative decoding) are not supported by SEA models."
        )
