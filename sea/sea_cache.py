"""The KV caches of causal SEA models.

`SeaCache` is a `DynamicCache` (keys and values per layer, so everything in transformers that reads or reorders a
cache keeps working); `SeaStaticCache` is transformers' static layout (fixed buffers of `max_cache_len` slots,
written in place), what compiled generation needs. Both also hold each layer's `SeaCausalState` and the padding
mask of every position so far. With them a decode step reads only the new token's selected keys, not the whole
prefix; `SeaCache`'s layers append in place (`SeaKeyValueLayer`), so a decode step does not copy the prefix either.
"""

from dataclasses import fields

import torch
from transformers import Cache, DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer
from transformers.utils import is_torchdynamo_compiling

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
    that is never continued wastes nothing); a continuation that does not fit regrows with spare room. Batch
    reordering and selection (beam search) apply to the buffers, so they keep their room; anything else that
    replaces `keys`/`values` (cropping, offloading) drops the buffers, and the next append starts a fresh one."""

    is_croppable = False  # its model's SEA state cannot drop tokens (SeaCache.crop)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
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
        # Under autograd an in-place append would change a view that an earlier forward may have saved for its
        # backward (even keys that need no gradient are saved for the queries' gradient): appends then copy.
        tracked = torch.is_grad_enabled()
        if (tracked or handed_out is not current or buffer.shape[-2] < needed or buffer.shape[:-2] != new.shape[:-2]
                or (buffer.is_inference() and not torch.is_inference_mode_enabled())):  # read-only outside that mode
            room = 0 if length == 0 or tracked else max(APPEND_ROOM_MIN, needed // APPEND_ROOM_FRACTION)
            buffer = new.new_empty(*new.shape[:-2], needed + room, new.shape[-1])
            if length:
                buffer[..., :length, :] = current
        buffer[..., length:needed, :] = new
        view = buffer[..., :needed, :]
        self._buffers[name] = (buffer, view)
        return view

    def _map_batch(self, fn) -> None:
        """Applies a batch reordering or selection to the buffers (room included) where the cache holds views of
        them, to the tensors themselves otherwise."""
        for name in ("keys", "values"):
            current = getattr(self, name)
            buffer, handed_out = self._buffers.pop(name, (None, None))
            if handed_out is not current:
                setattr(self, name, fn(current))
                continue
            buffer = fn(buffer)
            view = buffer[..., : current.shape[-2], :]
            self._buffers[name] = (buffer, view)
            setattr(self, name, view)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._map_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._buffers = {}

    def offload(self) -> None:
        super().offload()
        self._buffers = {}

    def reset(self) -> None:
        """Empties the layer (transformers 5.17's `reset` zeroes the keys and keeps their length; a SEA cache that
        is reset starts over)."""
        self.keys = self.values = None
        self.is_initialized = False
        self._buffers = {}
        super().reset()


class SeaCacheMixin:
    """What both SEA caches hold beside transformers' keys and values: the signature of the model that filled
    them, each layer's `SeaCausalState` and the (N, T) key padding mask; and how a model's forward finds its
    cache (`for_model`)."""

    def _init_sea(self, config) -> None:
        self.signature = model_signature(config)
        self.sea_states: dict[int, SeaCausalState] = {}
        self.key_valid: torch.Tensor | None = None  # (N, T_cached) bool; a static cache's (N, max_cache_len)
        self.cropped = False  # tokens were removed: the SEA states no longer match the keys

    @classmethod
    def for_model(cls, given, config) -> "SeaCacheMixin":
        """The cache a SEA forward should continue: the `given` cache itself when it is a SEA cache of this model,
        a new `SeaCache` in place of an empty cache (a `SeaStaticCache` of its size in place of an empty
        `StaticCache`), and a clear error for anything else."""
        if isinstance(given, SeaCacheMixin):
            if given.signature != model_signature(config):
                raise ValueError(
                    f"This {type(given).__name__} was built by a different model ({given.signature}); this model is "
                    f"{model_signature(config)}. Start generation without a cache."
                )
            if given.cropped:
                raise ValueError(
                    "This SeaCache was cropped (assisted or speculative decoding rolled it back): SEA's kernel-"
                    "attention prefix sums cannot drop tokens, so it cannot be continued. Start generation without "
                    "a cache; assisted and speculative decoding are not supported by SEA models."
                )
            return given
        if given is None or given.get_seq_length() == 0:
            if isinstance(given, StaticCache):
                return SeaStaticCache(config, given.layers[0].max_cache_len)
            return SeaCache(config)
        raise ValueError(
            f"A SEA model cannot continue a filled {type(given).__name__}: it needs SEA's own state beside "
            "the keys and values. Pass no cache (generate() makes a SeaCache) or one the model returned."
        )

    @property
    def new_slots(self) -> torch.Tensor | None:
        """Where the current forward's positions lie in the buffers, when not at their end (`SeaAttention`)."""
        return None

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

    @property
    def is_croppable(self) -> bool:
        return False


class SeaCache(SeaCacheMixin, DynamicCache):
    """Keys/values like `DynamicCache` (appended in place, `SeaKeyValueLayer`), plus SEA's per-layer causal state
    and the key padding mask."""

    def __init__(self, config):
        super().__init__()
        self.layer_class_to_replicate = SeaKeyValueLayer
        self._init_sea(config)

    def crop(self, tokens_to_remove: int) -> None:
        """SEA's kernel-attention prefix sums cannot drop tokens. Removing none is a no-op (generate() calls
        `crop(0)` between steps on some devices); removing some crops the keys and values but leaves the cache
        unable to continue: `SeaCache.for_model` then refuses it (generate() on MPS may crop a cache it discards)."""
        # transformers 5.17 still accepts the legacy positive argument: the length to keep.
        length = self.get_seq_length()
        removed = max(0, length - tokens_to_remove) if tokens_to_remove > 0 else min(-tokens_to_remove, length)
        if removed == 0:
            return
        super().crop(-removed)
        if self.key_valid is not None:
            self.key_valid = self.key_valid[:, : length - removed]
        self.cropped = True

    def reset(self) -> None:
        super().reset()
        self.sea_states = {}
        self.key_valid = None
        self.cropped = False


class SeaStaticCache(SeaCacheMixin, Cache):
    """transformers' static cache layout for SEA: every layer's keys and values in buffers of `max_cache_len`
    slots (`StaticLayer`, written in place), and the SEA states and the (N, max_cache_len) key mask in fixed
    buffers too, updated in place, so that a decode step has the same shapes and addresses at every position: what
    `torch.compile(fullgraph=True)` and CUDA graphs need (`generate(cache_implementation="static")`). Slots after
    the positions so far are unfilled, and the key mask marks them invalid. SEA applies no sliding window, so every
    layer is a full one, whatever the config's `sliding_window`."""

    def __init__(self, config, max_cache_len: int):
        super().__init__(layers=[StaticLayer(max_cache_len) for _ in range(config.num_hidden_layers)])
        self._init_sea(config)
        self._new_slots: torch.Tensor | None = None

    @property
    def max_cache_len(self) -> int:
        return self.layers[0].max_cache_len

    @property
    def new_slots(self) -> torch.Tensor | None:
        return self._new_slots

    def begin_forward(self, batch_size: int, num_new: int, device: torch.device) -> torch.Tensor:
        """Called once per forward, before any layer writes: the slots (T,) the forward's positions go to."""
        if self.key_valid is None:
            self.key_valid = self._static(torch.zeros(batch_size, self.max_cache_len, dtype=torch.bool, device=device))
        past = self.layers[0].cumulative_length if self.layers[0].is_initialized else 0
        self._new_slots = torch.arange(num_new, device=device) + past
        return self._new_slots

    @staticmethod
    def _static(buffer: torch.Tensor) -> torch.Tensor:
        # A fixed address for CUDA graphs (as transformers' StaticLayer does); not while tracing, which rejects it.
        if not is_torchdynamo_compiling():
            torch._dynamo.mark_static_address(buffer)
        return buffer

    def set_sea_state(self, layer_idx: int, state: SeaCausalState) -> None:
        """Copies `state` into the layer's state buffers (made at the first forward): in place, so compiled
        decode steps keep reading and writing the same addresses."""
        kept = self.sea_states.get(layer_idx)
        if kept is None:
            self.sea_states[layer_idx] = state.map(lambda t: self._static(t.clone()))
            return
        for field in fields(state):
            getattr(kept, field.name).copy_(getattr(state, field.name))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("A SeaStaticCache cannot drop tokens: SEA's kernel-attention prefix sums cannot.")

    def reset(self) -> None:
        """Empties the cache for a new generation, keeping its buffers (as `StaticCache.reset` does)."""
        super().reset()
        for state in self.sea_states.values():
            state.map(torch.Tensor.zero_)
        if self.key_valid is not None:
            self.key_valid.zero_()
        self.cropped = False
