"""ViLaVT: Qwen2.5-VL whose vision encoder re-encodes images conditioned on a text query.

f0 = V(I, ∅) for the original images, f_t = V(C_t, q_t) for the crops of round t: in the query-aware
("QA") vision blocks, the image tokens of all images mapped to one query attend jointly to each
other and to that query's projected tokens (extra keys/values, rotary on the keys only); different
queries never interact. Everything else is stock transformers Qwen2.5-VL.

Written in the style of transformers' `modular_*.py`: subclass, override only what ViLaVT changes.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import Qwen3Model
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLTextModel,
    Qwen2_5_VLVisionAttention,
    Qwen2_5_VLVisionBlock,
    apply_rotary_pos_emb_vision,
    eager_attention_forward,
)
from transformers.utils import logging
from transformers.utils.generic import is_flash_attention_requested
from transformers.vision_utils import get_vision_position_ids

from .configuration_vilavt import ViLaVTConfig, ViLaVTVisionConfig
from .generation_vilavt import ViLaVTChatMixin

logger = logging.get_logger(__name__)

# The official checkpoints use the pre-4.52 transformers layout (REFERENCE.md §1.8). Registered for our
# class so `from_pretrained` reads it and `save_pretrained` writes it back (official tools read our saves).
OFFICIAL_KEY_LAYOUT = [
    WeightRenaming(source_patterns=r"^visual", target_patterns="model.visual"),
    WeightRenaming(source_patterns=r"^text_encoder", target_patterns="model.text_encoder"),
    WeightRenaming(source_patterns=r"^text_proj", target_patterns="model.text_proj"),
    WeightRenaming(
        source_patterns=r"^model(?!\.(language_model|visual|text_encoder|text_proj))",
        target_patterns="model.language_model",
    ),
]
register_checkpoint_conversion_mapping("ViLaVTForConditionalGeneration", OFFICIAL_KEY_LAYOUT, overwrite=True)
# The base model (prefix "model") needs only the language-model rename, as stock Qwen2_5_VLModel does: its
# other parts are where the official layout has them once the loader strips the "model." prefix.
register_checkpoint_conversion_mapping("ViLaVTModel", OFFICIAL_KEY_LAYOUT[-1:], overwrite=True)


# --------------------------------------------------------------------------------------------------
# Query groups: which image tokens and query tokens share an attention segment in the QA blocks.
# Pure functions of grid_thw, the image-to-query mapping and the query mask (the vLLM model reuses them).
# --------------------------------------------------------------------------------------------------


@dataclass
class QueryGroups:
    """Layout of the query-aware attention for one vision forward (`build_query_groups`).

    Group g is one attention segment: the image tokens of every image mapped to query g attend to each
    other and, as extra keys/values only, to the valid tokens of query g. Windows permute tokens within
    each image only, so a group is a contiguous segment both in patch order and in window order.
    """

    position_ids: torch.Tensor  # [P, 2] rotary (row, col) of every patch, with the per-group offsets
    query_position_ids: torch.Tensor | None  # [L] rotary slot of each valid query token (both axes), query by query
    kv_index: torch.Tensor | None  # order of cat([image keys, query keys]) that lays keys out group by group
    cu_seqlens_q: torch.Tensor  # [G + 1] int32, over image tokens
    cu_seqlens_k: torch.Tensor  # [G + 1] int32, over image + query tokens
    q_lengths: list[int]
    k_lengths: list[int]
    # What the QA blocks read from the query, set by `ViLaVTVisionModel.query_groups` (model-dependent).
    query_embeds: torch.Tensor | None = None  # [L, hidden] valid query features, query by query
    query_cos: torch.Tensor | None = None  # [L, head_dim] rotary of the query keys
    query_sin: torch.Tensor | None = None

    def pack_keys(self, image_states: torch.Tensor, query_states: torch.Tensor) -> torch.Tensor:
        """Keys (or values) of the image tokens [P, ...] and of the query tokens [L, ...], group by group."""
        return torch.cat([image_states, query_states.to(image_states.dtype)])[self.kv_index]

    def attention_mask(self) -> torch.Tensor:
        """[P, P + L] bool: image token i may attend key j of cat([image keys, query keys]). The same segments
        as one dense mask, for kernels that take a mask rather than cu_seqlens (memory grows as P²)."""
        lengths = lambda values: torch.tensor(values, device=self.cu_seqlens_q.device)  # noqa: E731
        group = torch.arange(len(self.q_lengths), device=self.cu_seqlens_q.device)
        image_group = group.repeat_interleave(lengths(self.q_lengths))
        query_group = group.repeat_interleave(lengths(self.k_lengths) - lengths(self.q_lengths))
        return image_group[:, None] == torch.cat([image_group, query_group])[None, :]

def check_query_mapping(mapping: list[int], num_images: int, num_queries: int) -> None:
    """Raise a ValueError naming the field unless `mapping` assigns every image to an existing query
    row with the images of one query contiguous and queries ascending (the layout the QA blocks and the
    reference assume)."""
    if len(mapping) != num_images:
        raise ValueError(
            f"image_to_query_mapping has {len(mapping)} entries but image_grid_thw describes {num_images} images"
        )
    for i, q in enumerate(mapping):
        if not 0 <= q < num_queries:
            raise ValueError(
                f"image_to_query_mapping[{i}] = {q} points to a missing query row (query_ids has {num_queries} rows)"
            )
        if i and q < mapping[i - 1]:
            raise ValueError(
                "image_to_query_mapping must be non-decreasing (images of one query contiguous, queries in "
                f"ascending order); entry {i} is {q} after {mapping[i - 1]}: {mapping}"
            )


def build_query_groups(
    grid_thw: torch.Tensor,
    spatial_merge_size: int,
    image_to_query_mapping: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
) -> QueryGroups:
    """The QA attention layout of images `grid_thw` [N, 3] (patch grids) encoded with queries.

    `image_to_query_mapping` [N]: the query row of each image (default: image i with query i).
    `query_mask` [Q, T]: 1 = real query token, an all-zero row is an empty query (default: N empty queries).
    Images of one query are laid out diagonally in rotary space (REFERENCE.md §1.5): each starts where
    the previous one of its group ends (offset += max(h, w)); the query's slots follow the last one.
    Per-image and per-query bookkeeping runs on the host (N and Q are small); per-token work is tensor ops.
    """
    device = grid_thw.device
    grid = grid_thw.tolist()
    num_images = len(grid)
    num_queries = query_mask.shape[0] if query_mask is not None else num_images
    if image_to_query_mapping is None:
        if num_queries != num_images:
            raise ValueError(
                f"image_to_query_mapping is required when the number of query rows ({num_queries}) "
                f"differs from the number of images ({num_images})"
            )
        mapping = list(range(num_images))
    else:
        mapping = image_to_query_mapping.tolist()
    check_query_mapping(mapping, num_images, num_queries)

    sides = [max(h, w) for _, h, w in grid]
    counts = [t * h * w for t, h, w in grid]
    offsets, group_side, group_len = [], [0] * num_queries, [0] * num_queries
    for side, count, q in zip(sides, counts, mapping):
        offsets.append(group_side[q])
        group_side[q] += side
        group_len[q] += count
    position_ids = get_vision_position_ids(grid_thw, spatial_merge_size)
    position_ids = position_ids + torch.repeat_interleave(
        torch.tensor(offsets, device=device), torch.tensor(counts, device=device)
    ).unsqueeze(-1)

    valid = None if query_mask is None else query_mask.bool()
    query_lengths = [0] * num_queries if valid is None else valid.sum(dim=1).tolist()
    query_position_ids = kv_index = None
    if sum(query_lengths):
        slot = torch.arange(valid.shape[1], device=device)
        query_position_ids = (torch.tensor(group_side, device=device).unsqueeze(1) + slot)[valid]
        num_patches = sum(counts)
        image_start = [sum(group_len[:q]) for q in range(num_queries)]
        query_start = [num_patches + sum(query_lengths[:q]) for q in range(num_queries)]
        kv_index = torch.cat(
            [
                torch.arange(start, start + length, device=device)
                for q in range(num_queries)
                for start, length in ((image_start[q], group_len[q]), (query_start[q], query_lengths[q]))
            ]
        )

    k_lengths = [n + m for n, m in zip(group_len, query_lengths)]
    cumsum = lambda lengths: torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)  # noqa: E731
    return QueryGroups(
        position_ids=position_ids,
        query_position_ids=query_position_ids,
        kv_index=kv_index,
        cu_seqlens_q=cumsum(group_len),
        cu_seqlens_k=cumsum(k_lengths),
        q_lengths=group_len,
        k_lengths=k_lengths,
    )


# --------------------------------------------------------------------------------------------------
# Dynamic vision encoder
# --------------------------------------------------------------------------------------------------


class ViLaVTQueryAwareVisionAttention(Qwen2_5_VLVisionAttention):
    """Vision attention whose segments are query groups; query tokens join as extra keys/values."""

    def __init__(self, config: ViLaVTVisionConfig) -> None:
        super().__init__(config)
        self.instruct_key_proj = nn.Linear(self.dim, self.dim)
        self.instruct_value_proj = nn.Linear(self.dim, self.dim)

    def query_keys_values(self, groups: QueryGroups) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [L, heads, head_dim] of the valid query tokens. They are never queries: of the
        stock rotary pair only the key is kept."""
        shape = (groups.query_embeds.shape[0], self.num_heads, -1)
        key = self.instruct_key_proj(groups.query_embeds).view(shape)
        value = self.instruct_value_proj(groups.query_embeds).view(shape)
        return apply_rotary_pos_emb_vision(key, key, groups.query_cos, groups.query_sin)[1], value

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seqlen: int | None = None,
        query_groups: QueryGroups | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # Not super().forward: it attends within square segments (one cu_seqlens for queries and keys), while
        # a group's keys and values also hold its query's tokens. Its projection and attention call are
        # restated with separate query and key segments; the tower's cu_seqlens / max_seqlen are unused.
        seq_length = hidden_states.shape[0]
        query, key, value = (
            self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        )
        query, key = apply_rotary_pos_emb_vision(query, key, *position_embeddings)
        groups = query_groups
        if groups.kv_index is not None:
            query_key, query_value = self.query_keys_values(groups)
            key, value = groups.pack_keys(key, query_key), groups.pack_keys(value, query_value)

        query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = 0.0 if not self.training else self.attention_dropout
        common = dict(attention_mask=None, scaling=self.scaling, dropout=dropout, is_causal=False)
        if is_flash_attention_requested(self.config):
            attn_output, _ = attention_interface(
                self,
                query,
                key,
                value,
                cu_seq_lens_q=groups.cu_seqlens_q,
                cu_seq_lens_k=groups.cu_seqlens_k,
                max_length_q=max(groups.q_lengths),
                max_length_k=max(groups.k_lengths),
                **common,
                **kwargs,
            )
        else:
            segments = zip(
                query.split(groups.q_lengths, dim=2),
                key.split(groups.k_lengths, dim=2),
                value.split(groups.k_lengths, dim=2),
            )
            # A query no image maps to contributes keys to nobody.
            outputs = [attention_interface(self, q, k, v, **common)[0] for q, k, v in segments if q.shape[2] > 0]
            attn_output = torch.cat(outputs, dim=1)
        return self.proj(attn_output.reshape(seq_length, -1).contiguous())


class ViLaVTQueryAwareVisionBlock(Qwen2_5_VLVisionBlock):
    """A stock block with the query-aware attention; `query_groups` reaches it through the block's kwargs."""

    def __init__(self, config: ViLaVTVisionConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__(config, attn_implementation)
        self.attn = ViLaVTQueryAwareVisionAttention(config)


class ViLaVTVisionModel(Qwen2_5_VisionTransformerPretrainedModel):
    """Qwen2.5-VL vision tower with query-aware blocks at `config.integration_point`.

    `forward(hidden_states, grid_thw, query_groups=None)`: `query_groups` from `self.query_groups(...)`.
    Without it each image is its own group with an empty query, i.e. f0 = V(I, ∅).
    """

    config: ViLaVTVisionConfig
    _no_split_modules = ["Qwen2_5_VLVisionBlock", "ViLaVTQueryAwareVisionBlock"]

    def __init__(self, config: ViLaVTVisionConfig, *inputs, **kwargs) -> None:
        super().__init__(config, *inputs, **kwargs)
        for index in config.query_aware_blocks:
            self.blocks[index] = ViLaVTQueryAwareVisionBlock(config)
        self.post_init()

    def query_groups(
        self,
        grid_thw: torch.Tensor,
        image_to_query_mapping: torch.Tensor | None = None,
        instruct_embeds: torch.Tensor | None = None,
        instruct_mask: torch.Tensor | None = None,
    ) -> QueryGroups:
        """`build_query_groups` plus what the QA blocks read from the queries: the valid rows of
        `instruct_embeds` [Q, T, hidden] (query features after `text_proj`) and their rotary.
        `instruct_mask` [Q, T] marks the valid slots."""
        groups = build_query_groups(grid_thw, self.spatial_merge_size, image_to_query_mapping, instruct_mask)
        if groups.query_position_ids is not None:
            if instruct_embeds is None:
                raise ValueError("instruct_mask marks query tokens but instruct_embeds is None")
            groups.query_embeds = instruct_embeds[instruct_mask.bool()].to(self.dtype)
            positions = groups.query_position_ids
            groups.query_cos, groups.query_sin = self.rotary_pos_emb(
                groups.query_embeds, torch.stack([positions, positions], dim=-1)
            )
        return groups

    def forward(
        self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, query_groups: QueryGroups | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        # The parent reads the offset rotary positions as precomputed `position_ids` and passes `query_groups`
        # to every block: the QA attention reads it, the stock attention functions ignore it.
        if query_groups is None:
            query_groups = self.query_groups(grid_thw)
        return super().forward(
            hidden_states, grid_thw, position_ids=query_groups.position_ids, query_groups=query_groups, **kwargs
        )


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class ViLaVTModel(Qwen2_5_VLModel):
    """Qwen2.5-VL model whose image features depend on queries: `text_encoder` (Qwen3) + `text_proj`
    feed the query-aware blocks of `visual`."""

    config: ViLaVTConfig
    _no_split_modules = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "ViLaVTQueryAwareVisionBlock"]
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # a ViLaVT checkpoint carries the head; this class has none

    def __init__(self, config: ViLaVTConfig):
        # Not super().__init__: it would build a stock vision tower only to replace it (0.67 B parameters at 7B),
        # and consuming the random stream for it would change every seeded model (tiny models, the demo recipe).
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.visual = ViLaVTVisionModel._from_config(config.vision_config)
        self.language_model = Qwen2_5_VLTextModel._from_config(config.text_config)
        self.text_encoder = Qwen3Model._from_config(config.text_encoder_config)
        self.text_proj = nn.Linear(config.text_encoder_config.hidden_size, config.vision_config.hidden_size)
        self.rope_deltas = None
        self.post_init()

    def encode_queries(self, query_ids: torch.Tensor, query_attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token query features text_proj(text_encoder(q).last_hidden_state), [Q, T, vision hidden].
        Only slots with mask 1 are meaningful. The encoder runs causally with positions 0..T-1 per row."""
        hidden = self.text_encoder(
            input_ids=query_ids, attention_mask=query_attention_mask, use_cache=False
        ).last_hidden_state
        return self.text_proj(hidden.to(self.text_proj.weight.dtype))

    def _query_features(
        self,
        num_images: int,
        query_ids: torch.Tensor | None,
        query_attention_mask: torch.Tensor | None,
        image_to_query_mapping: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(instruct_embeds, instruct_mask) for the vision tower; checks the query tensors' shapes."""
        if query_ids is None:
            if query_attention_mask is not None:
                raise ValueError("query_attention_mask was given without query_ids")
            if image_to_query_mapping is None:
                return None, None
            # Joint encoding without text: every referenced query row is empty.
            num_queries = int(image_to_query_mapping.max()) + 1 if num_images else 0
            return None, torch.zeros(num_queries, 1, dtype=torch.long, device=image_to_query_mapping.device)
        if query_ids.dim() != 2:
            raise ValueError(f"query_ids must be 2-D [num_queries, length], got shape {tuple(query_ids.shape)}")
        if query_attention_mask is None:
            query_attention_mask = torch.ones_like(query_ids)
        if query_attention_mask.shape != query_ids.shape:
            raise ValueError(
                f"query_attention_mask has shape {tuple(query_attention_mask.shape)} but query_ids has "
                f"shape {tuple(query_ids.shape)}"
            )
        if query_ids.shape[1] > self.config.max_query_length:
            raise ValueError(
                f"query_ids rows have {query_ids.shape[1]} tokens but the model accepts at most "
                f"max_query_length={self.config.max_query_length}"
            )
        has_tokens = query_attention_mask.bool().any(dim=1)
        if not bool(has_tokens.any()):
            return None, query_attention_mask  # only empty queries: skip the text encoder
        features = self.encode_queries(query_ids[has_tokens], query_attention_mask[has_tokens])
        instruct_embeds = features.new_zeros(*query_ids.shape, features.shape[-1])
        instruct_embeds[has_tokens] = features
        return instruct_embeds, query_attention_mask

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.LongTensor | None = None,
        query_ids: torch.LongTensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        image_to_query_mapping: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Image features V(I, q): `pooler_output` is a tuple with one [tokens_i, hidden] tensor per image,
        in image order. `image_to_query_mapping[i]` is the row of `query_ids` image i is encoded with."""
        if image_grid_thw is None:
            raise ValueError("image_grid_thw is required to encode pixel_values")
        instruct_embeds, instruct_mask = self._query_features(
            image_grid_thw.shape[0], query_ids, query_attention_mask, image_to_query_mapping
        )
        query_groups = self.visual.query_groups(image_grid_thw, image_to_query_mapping, instruct_embeds, instruct_mask)
        # The parent passes its kwargs on to `self.visual`.
        return super().get_image_features(pixel_values, image_grid_thw, query_groups=query_groups, **kwargs)

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token types for 3-D rotary positions (0 text, 1 image, 2 video), derived from placeholder ids so
        inputs made without our processor (e.g. the official ones) work."""
        return (input_ids == self.config.image_token_id).int() + 2 * (input_ids == self.config.video_token_id).int()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        query_ids: torch.LongTensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        image_to_query_mapping: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        mm_encoder_outputs: dict | None = None,
        originals: list | None = None,  # the images the processor carries for generate's crops; not used here
        **kwargs,
    ):
        if pixel_values is not None:
            if mm_encoder_outputs is not None:
                raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
            mm_encoder_outputs = {
                "image": self.get_image_features(
                    pixel_values,
                    image_grid_thw,
                    query_ids=query_ids,
                    query_attention_mask=query_attention_mask,
                    image_to_query_mapping=image_to_query_mapping,
                    return_dict=True,
                )
            }
        if mm_token_type_ids is None and input_ids is not None:
            mm_token_type_ids = self.mm_token_type_ids(input_ids)
        return super().forward(
            input_ids=input_ids,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )


class ViLaVTForConditionalGeneration(ViLaVTChatMixin, Qwen2_5_VLForConditionalGeneration):
    """ViLaVT with its language-model head. Extra forward inputs: `query_ids`, `query_attention_mask`,
    `image_to_query_mapping` (see `ViLaVTModel.get_image_features`). `generate` runs the chatting loop and
    `chat` asks one question (`generation_vilavt.ViLaVTChatMixin`)."""

    config: ViLaVTConfig
    _no_split_modules = ViLaVTModel._no_split_modules

    def __init__(self, config: ViLaVTConfig):
        # Not super().__init__: it would build a whole stock Qwen2_5_VLModel, language model included, only to
        # replace it (twice the model's memory at construction).
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.model = ViLaVTModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


ViLaVTForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "ViLaVTForConditionalGeneration",
    "ViLaVTModel",
    "ViLaVTVisionModel",
    "ViLaVTQueryAwareVisionBlock",
    "ViLaVTQueryAwareVisionAttention",
]
