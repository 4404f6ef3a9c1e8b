"""ViLaVT as a vLLM model: vLLM's Qwen2.5-VL (its paged-attention language model, M-RoPE and
multimodal plumbing) whose vision side is the plug-in's own query-aware tower.

The vision side is not rewritten for vLLM: `visual` is the plug-in's `ViLaVTVisionModel`, `text_encoder`
and `text_proj` are the plug-in's modules, and image features come from the plug-in's
`ViLaVTModel.get_image_features` (query grouping, rotary offsets, query-aware attention segments), so
they equal the transformers model's by construction. The parameter names are the checkpoint's, so the
same folder loads in both.
"""

import torch
import torch.nn as nn
from transformers import Qwen3Model
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.utils import WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..remote_code.modeling_vilavt import ViLaVTModel, ViLaVTVisionModel
from .processing import ViLaVTMultiModalProcessor, ViLaVTProcessingInfo


def _per_item(value, count: int) -> list:
    """A batched field as one entry per item (vLLM stacks equal shapes and lists unequal ones)."""
    items = list(value) if isinstance(value, (list, tuple)) else list(value.unbind(0))
    if len(items) != count:
        raise ValueError(f"expected {count} image items, got {len(items)}")
    return items


@MULTIMODAL_REGISTRY.register_processor(
    ViLaVTMultiModalProcessor, info=ViLaVTProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class ViLaVTForConditionalGenerationVLLM(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with ViLaVT's query-aware vision side (see the module docstring)."""

    # Official / plug-in checkpoint layout (REFERENCE.md §1.8) and the transformers >= 4.52 one.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "model.visual.": "visual.",
            "model.text_encoder.": "text_encoder.",
            "model.text_proj.": "text_proj.",
            "lm_head.": "language_model.lm_head.",
            "model.": "language_model.model.",
        }
    )
    # vLLM's sharded / LoRA / CUDA-graph paths for the stock tower do not apply to the plug-in's tower.
    supports_encoder_tp_data = False
    supports_tower_connector_lora = False
    # The processor normalises pixels (the plug-in's tower has no on-device input normalisation).
    supports_mm_device_do_normalize = False

    # The plug-in model's query side, the same functions: `get_image_features` runs `text_encoder` and
    # `text_proj` on the queries and `visual` on the pixels with the image -> query mapping.
    get_image_features = ViLaVTModel.get_image_features
    _query_features = ViLaVTModel._query_features
    encode_queries = ViLaVTModel.encode_queries

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        # The parent's __init__ builds vLLM's stock vision tower, which takes no query; the rest of it is
        # repeated here with the plug-in's tower instead.
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        multimodal_config = vllm_config.model_config.get_multimodal_config()
        self.use_data_parallel = False
        self.config = config
        self.model_config = vllm_config.model_config
        self.vllm_config = vllm_config
        self.multimodal_config = multimodal_config
        self.video_pruning_rate = None
        self.is_multimodal_pruning_enabled = False
        dtype = vllm_config.model_config.dtype
        for sub in (config.vision_config, config.text_encoder_config):
            sub._attn_implementation = "sdpa"  # the plug-in's modules run on torch SDPA inside vLLM
        with self._mark_tower_model(vllm_config, "image"):
            self.visual = ViLaVTVisionModel._from_config(config.vision_config, dtype=dtype)
            self.text_encoder = Qwen3Model._from_config(config.text_encoder_config, dtype=dtype)
            self.text_proj = nn.Linear(
                config.text_encoder_config.hidden_size, config.vision_config.hidden_size, dtype=dtype
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["Qwen2ForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        self.encoder_log: list[int] = []  # images encoded per encoder call (read by tests and the bench)

    def embed_multimodal(self, **kwargs) -> tuple[torch.Tensor, ...]:
        """One feature tensor per image item. Items are grouped by call (`joint_key`); every group present
        is encoded once, in one vision call, from the pixels its items carry."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            if kwargs.get("image_embeds") is not None:
                raise ValueError("ViLaVT features depend on the query; precomputed image_embeds are not supported")
            return ()
        grids = kwargs["image_grid_thw"].tolist()
        count = len(grids)
        own = pixel_values.split([t * h * w for t, h, w in grids])
        keys = [tuple(key.tolist()) for key in _per_item(kwargs["joint_key"], count)]
        members = [int(i) for i in _per_item(kwargs["joint_index"], count)]
        joint_pixels = _per_item(kwargs["joint_pixel_values"], count)
        joint_grids = [g.tolist() for g in _per_item(kwargs["joint_grid_thw"], count)]
        query_ids = _per_item(kwargs["query_ids"], count)
        query_mask = _per_item(kwargs["query_attention_mask"], count)

        first_image_of_group, pixels, group_grids, mapping, query_rows, mask_rows = {}, [], [], [], [], []
        for i, key in enumerate(keys):
            if key in first_image_of_group:
                continue
            others = list(joint_pixels[i].split([t * h * w for t, h, w in joint_grids[i]]))
            others.insert(members[i], own[i])
            other_grids = list(joint_grids[i])
            other_grids.insert(members[i], grids[i])
            first_image_of_group[key] = len(group_grids)
            pixels += others
            group_grids += other_grids
            mapping += [len(query_rows)] * len(others)
            query_rows.append(query_ids[i])
            mask_rows.append(query_mask[i])
        device = pixel_values.device
        features = self.get_image_features(
            torch.cat(pixels),
            torch.tensor(group_grids, dtype=torch.long, device=device),
            query_ids=torch.stack(query_rows).to(device),
            query_attention_mask=torch.stack(mask_rows).to(device),
            image_to_query_mapping=torch.tensor(mapping, dtype=torch.long, device=device),
        ).pooler_output
        self.encoder_log.append(len(group_grids))
        return tuple(features[first_image_of_group[key] + member] for key, member in zip(keys, members))

    def get_encoder_cudagraph_config(self):
        raise NotImplementedError("ViLaVT's query-aware vision tower has no encoder CUDA-graph path")


__all__ = ["ViLaVTForConditionalGenerationVLLM"]
