"""ViLaVT as a vLLM model: vLLM's Qwen2.5-VL (its paged-attention language model, M-RoPE and
multimodal plumbing) whose vision side is the plug-in's own query-aware tower.

The vision side is not rewritten for vLLM: `visual` is the plug-in's `ViLaVTVisionModel`, `text_encoder`
and `text_proj` are the plug-in's modules, queries are checked and encoded by the plug-in's
`ViLaVTModel._query_features`, grouped by `ViLaVTVisionModel.query_groups` (`build_query_groups`: rotary
offsets, query-aware attention segments), and a call's query rows are batched by `batch_vision`, so the
features equal the transformers model's by construction. The parameter names are the checkpoint's, so the
same folder loads in both.
"""

import torch
import torch.nn as nn
from transformers import Qwen3Model
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.utils import WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..remote_code.modeling_vilavt import ViLaVTModel, ViLaVTVisionModel
from ..remote_code.processing_vilavt import batch_vision
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

    # The plug-in model's query side, the same functions (`text_encoder` and `text_proj` on the queries).
    _query_features = ViLaVTModel._query_features
    encode_queries = ViLaVTModel.encode_queries

    def get_image_features(self, pixel_values, image_grid_thw, query_ids=None, query_attention_mask=None,
                           image_to_query_mapping=None):
        """`ViLaVTModel.get_image_features`, restated: it ends in `super()` (Qwen2.5-VL's), which names
        ViLaVTModel, a class this one is not; Qwen2.5-VL's function is called directly instead."""
        instruct_embeds, instruct_mask = self._query_features(
            image_grid_thw.shape[0], query_ids, query_attention_mask, image_to_query_mapping
        )
        groups = self.visual.query_groups(image_grid_thw, image_to_query_mapping, instruct_embeds, instruct_mask)
        return Qwen2_5_VLModel.get_image_features(self, pixel_values, image_grid_thw, query_groups=groups, return_dict=True)

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

        first_image_of_group, groups, count_encoded = {}, [], 0
        for i, key in enumerate(keys):
            if key in first_image_of_group:
                continue
            pixels = list(joint_pixels[i].split([t * h * w for t, h, w in joint_grids[i]]))
            pixels.insert(members[i], own[i])
            group_grids = list(joint_grids[i])
            group_grids.insert(members[i], grids[i])
            first_image_of_group[key] = count_encoded
            count_encoded += len(group_grids)
            groups.append(  # one call: its images, its query row
                {
                    "pixel_values": torch.cat(pixels),
                    "image_grid_thw": torch.tensor(group_grids, dtype=torch.long),
                    "query_ids": query_ids[i][None],
                    "query_attention_mask": query_mask[i][None],
                    "image_to_query_mapping": torch.zeros(len(group_grids), dtype=torch.long),
                }
            )
        device = pixel_values.device
        batch = {key: value.to(device) for key, value in batch_vision(groups).items()}
        features = self.get_image_features(**batch).pooler_output
        self.encoder_log.append(count_encoded)
        return tuple(features[first_image_of_group[key] + member] for key, member in zip(keys, members))

    def get_encoder_cudagraph_config(self):
        raise NotImplementedError("ViLaVT's query-aware vision tower has no encoder CUDA-graph path")


__all__ = ["ViLaVTForConditionalGenerationVLLM"]
