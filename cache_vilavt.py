"""The chatting loop's KV cache: transformers' DynamicCache, growing in place.

`DynamicLayer` concatenates every new token onto the whole cache (a copy that grows with rows x cached
tokens, bench/kv_cache.py); a `GrowingLayer` writes into spare capacity instead.
"""

import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

# The forward's KV-cache keyword: `cache` from transformers 5.24 (`past_key_values` still works there, with a
# deprecation warning, until 5.40); `past_key_values` before 5.24, the range vLLM 0.32 installs with.
_FORWARD_PARAMETERS = inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters
CACHE_ARGUMENT = "cache" if "cache" in _FORWARD_PARAMETERS else "past_key_values"


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes new tokens into spare capacity instead of concatenating: `DynamicLayer`
    copies the whole cache every decoding step, which grows with rows x cached tokens (bench/kv_cache.py).
    `keys` / `values` are views of the filled part; assigning them (row selection, column pruning) adopts
    the tensor as the new buffer."""

    headroom = 0.25  # grow by a quarter of the needed length (at least `min_growth` tokens): amortised O(1)
    min_growth = 256

    def _adopt(self, name: str, tensor):
        if tensor is None or tensor.dim() < 4:  # lazy_initialization's empty placeholders, reset()
            setattr(self, name, None)
            self._length = 0
        else:
            setattr(self, name, tensor)
            self._length = tensor.shape[-2]

    keys = property(
        lambda self: None if self._key_buffer is None else self._key_buffer[..., : self._length, :],
        lambda self, tensor: self._adopt("_key_buffer", tensor),
    )
    values = property(
        lambda self: None if self._value_buffer is None else self._value_buffer[..., : self._length, :],
        lambda self, tensor: self._adopt("_value_buffer", tensor),
    )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._key_buffer = self._value_buffer = None
        self._length = 0
        self.is_initialized = True

    def _ensure(self, buffer, states, needed):
        if buffer is not None and buffer.shape[-2] >= needed and buffer.shape[:-2] == states.shape[:-2]:
            return buffer
        capacity = needed + max(self.min_growth, int(needed * self.headroom))
        grown = states.new_empty(*states.shape[:-2], capacity, states.shape[-1])
        if buffer is not None and self._length:
            grown[..., : self._length, :] = buffer[..., : self._length, :]
        return grown

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, needed = self._length, self._length + key_states.shape[-2]
        self._key_buffer = self._ensure(self._key_buffer, key_states, needed)
        self._value_buffer = self._ensure(self._value_buffer, value_states, needed)
        self._key_buffer[..., start:needed, :] = key_states
        self._value_buffer[..., start:needed, :] = value_states
        self._length = needed
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0


class GrowingCache(DynamicCache):
    """DynamicCache made of `GrowingLayer`s: the live cache of the chatting loop."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


__all__ = ["CACHE_ARGUMENT", "GrowingCache", "GrowingLayer"]
