"""ViLaVT configuration: Qwen2.5-VL plus a query text encoder and query-aware ("QA") vision blocks.

Reads the official ViLaVT `config.json` as it is (flat text fields, `text_encoder_config` as a Qwen3
config dict, `vision_config.integration_point` / `fullatt_block_indexes`, any `architectures`).
Building a default config never touches the network: the query encoder defaults to the
Qwen3-Embedding-0.6B architecture, written out below.
"""

import inspect

from transformers import Qwen3Config
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)

INTEGRATION_POINTS = ("all", "early", "late", "late2", "late3", "sparse")

# auto_map written into every saved config, so a checkpoint folder loads with trust_remote_code.
AUTO_MAP = {
    "AutoConfig": "configuration_vilavt.ViLaVTConfig",
    "AutoModel": "modeling_vilavt.ViLaVTForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_vilavt.ViLaVTForConditionalGeneration",
    "AutoProcessor": "processing_vilavt.ViLaVTProcessor",
}

# Qwen3-Embedding-0.6B, the query encoder of the released model (REFERENCE.md §1.2).
QWEN3_EMBEDDING_0_6B = dict(
    vocab_size=151669,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151643,
    max_window_layers=28,
)

# Qwen2.5-VL-7B-Instruct language model.
QWEN2_5_VL_7B_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    sliding_window=32768,
    max_window_layers=28,
    bos_token_id=151643,
    eos_token_id=151645,
)


def query_aware_block_indexes(integration_point: str, depth: int, fullatt_block_indexes) -> list[int]:
    """Vision blocks whose attention sees the query (REFERENCE.md §1.3)."""
    selectors = {
        "all": lambda i: True,
        "early": lambda i: i < depth // 2,
        "late": lambda i: i >= depth // 2,
        "late2": lambda i: i >= 3 * depth // 4,
        "late3": lambda i: i >= depth // 4,
        "sparse": lambda i: i in set(fullatt_block_indexes),
    }
    if integration_point not in selectors:
        raise ValueError(f"integration_point must be one of {INTEGRATION_POINTS}, got {integration_point!r}")
    return [i for i in range(depth) if selectors[integration_point](i)]


class ViLaVTVisionConfig(Qwen2_5_VLVisionConfig):
    r"""
    integration_point (`str`, *optional*, defaults to `"late"`):
        Which vision blocks are query-aware: `all`, `early` (first half), `late` (second half), `late2`
        (last quarter), `late3` (last three quarters) or `sparse` (the `fullatt_block_indexes`).
    fullatt_block_indexes (`list[int]`, *optional*, defaults to `[7, 15]`):
        Non-query blocks that attend over the whole image instead of windows. The released recipe
        (`intra_then_inter`, `late`) uses `[7, 15]`; query-aware blocks ignore windows anyway.
    """

    model_type = "vilavt_vision"

    hidden_size: int = 1280
    out_hidden_size: int = 3584
    tokens_per_second: int = 2
    fullatt_block_indexes: list[int] | tuple[int, ...] = (7, 15)
    integration_point: str = "late"

    def __post_init__(self, **kwargs):
        if self.integration_point not in INTEGRATION_POINTS:
            raise ValueError(
                f"vision_config.integration_point must be one of {INTEGRATION_POINTS}, got {self.integration_point!r}"
            )
        self.fullatt_block_indexes = list(self.fullatt_block_indexes)
        super().__post_init__(**kwargs)

    @property
    def query_aware_blocks(self) -> list[int]:
        return query_aware_block_indexes(self.integration_point, self.depth, self.fullatt_block_indexes)


# Flat text fields an official config.json repeats next to `text_config` (the nested one wins).
_TEXT_CONFIG_FIELDS = set(inspect.signature(Qwen2_5_VLTextConfig.__init__).parameters) | {
    "rope_scaling",
    "rope_theta",
    "rope_parameters",
    "vision_token_id",
}
_TOP_LEVEL_FIELDS = {"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"}


class ViLaVTConfig(Qwen2_5_VLConfig):
    r"""
    Configuration of a ViLaVT model: a Qwen2.5-VL model (`text_config`, `vision_config`) whose vision
    tower re-encodes images conditioned on a natural-language query, encoded by a Qwen3 text encoder
    (`text_encoder_config`).

    text_encoder_config (`dict` or `Qwen3Config`, *optional*):
        The query text encoder. Defaults to the Qwen3-Embedding-0.6B architecture (offline).
    max_query_length (`int`, *optional*, defaults to 50):
        Longest query (in query-tokenizer tokens) the model accepts; the reference trained with 50.

    The defaults describe ViLaVT-7B (Qwen2.5-VL-7B + Qwen3-Embedding-0.6B, `late` integration).
    """

    model_type = "vilavt"
    sub_configs_defaults = {
        "vision_config": ViLaVTVisionConfig,
        "text_config": Qwen2_5_VLTextConfig,
        "text_encoder_config": Qwen3Config,
    }
    if not hasattr(PreTrainedConfig, "sub_configs_defaults"):  # transformers < 5.20 reads `sub_configs`
        sub_configs = sub_configs_defaults

    text_encoder_config: dict | Qwen3Config | None = None
    max_query_length: int = 50

    def __post_init__(self, **kwargs):
        flat_text = {k: kwargs.pop(k) for k in list(kwargs) if k in _TEXT_CONFIG_FIELDS and k not in _TOP_LEVEL_FIELDS}
        if self.text_config is None:
            # Flat (hub-style) text fields override the 7B defaults.
            self.text_config = {**QWEN2_5_VL_7B_TEXT, **flat_text}
            self.text_config.setdefault("dtype", kwargs.get("torch_dtype", kwargs.get("dtype")))
        # else: official configs carry the text fields twice (flat and nested); the nested copy wins so
        # the two can never disagree.
        if not isinstance(self.text_encoder_config, Qwen3Config):
            fields = {k: v for k, v in (self.text_encoder_config or QWEN3_EMBEDDING_0_6B).items() if k != "model_type"}
            self.text_encoder_config = Qwen3Config(**fields)
        if kwargs.get("auto_map") is None:
            kwargs["auto_map"] = dict(AUTO_MAP)
        super().__post_init__(**kwargs)
        if self.max_query_length < 1:
            raise ValueError(f"max_query_length must be >= 1, got {self.max_query_length}")


__all__ = ["ViLaVTConfig", "ViLaVTVisionConfig", "INTEGRATION_POINTS", "query_aware_block_indexes"]

ViLaVTConfig.register_for_auto_class()
