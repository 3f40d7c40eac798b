"""The KV cache of causal SEA models.

A `DynamicCache` (keys and values per layer, so everything in transformers that reads or reorders a cache keeps
working) that also holds each layer's `SeaCausalState` and the padding mask of every position so far. With them a
decode step reads only the new token's selected keys, not the whole prefix; and its layers append in place
(`SeaKeyValueLayer`), so a decode step does not copy the prefix either.
"""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .sea_attention import SeaCausalState


def model_signature(config) -> tuple:
    """What a cache must agree on with the model that continues it."""
    return (
        config.model_type, config.num_hidden_layers, config.num_attention_heads, config.hidden_size,
        config.sea_compressed_width, config.sea_performer_nb_factor,
    )


# Spare room a layer's buffers get when an append outgrows them: an eighth of the length, at least 64 tokens. An
# append then copies the prefix once every length / 8 tokens instead of at every token.
APPEND_ROOM_FRACTION = 8
APPEND_ROOM_MIN = 64


class SeaKeyValueLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of larger buffers that appends write into. `DynamicLayer`
    concatenates: every decode step copies all cached keys and values, and on CUDA allocates a buffer of a new size
    (at 64k tokens that, not attention, was most of a decode step). The first fill is allocated exactly (a forward
    that is never continued wastes nothing); a continuation that does not fit regrows with spare room. Anything
    that replaces `keys`/`values` (beam reordering, batch selection, offloading) is followed by a fresh buffer."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (buffer, the view handed out)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self._appended("keys", key_states)
        self.values = self._appended("values", value_states)
        return self.keys, self.values

    def _appended(self, name: str, new: torch.Tensor) -> torch.Tensor:
        current = getattr(self, name)
        length = current.shape[-2] if current.dim() == new.dim() else 0  # lazy initialization left an empty 1-D tensor
        needed = length + new.shape[-2]
        buffer, handed_out = self._buffers.get(name, (None, None))
        # Under autograd an in-place append would change what an earlier forward saved for its backward.
        tracked = torch.is_grad_enabled() and (new.requires_grad or current.requires_grad)
        if tracked or handed_out is not current or buffer.shape[-2] < needed or buffer.shape[:-2] != new.shape[:-2]:
            room = 0 if length == 0 or tracked else max(APPEND_ROOM_MIN, needed // APPEND_ROOM_FRACTION)
            buffer = new.new_empty(*new.shape[:-2], needed + room, new.shape[-1])
            if length:
                buffer[..., :length, :] = current
        buffer[..., length:needed, :] = new
        view = buffer[..., :needed, :]
        self._buffers[name] = (buffer, view)
        return view


class SeaCache(DynamicCache):
    """Keys/values like `DynamicCache` (appended in place, `SeaKeyValueLayer`), plus SEA's per-layer causal state
    and the key padding mask."""

    def __init__(self, config):
        super().__init__()
        self.layer_class_to_replicate = SeaKeyValueLayer
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
