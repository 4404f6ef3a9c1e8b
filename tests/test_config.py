"""ViLaVTConfig: offline defaults, the official config.json as it is, integration points."""

import json

import pytest
from conftest import REFERENCE

from vilavt import ViLaVTConfig
from vilavt.remote_code.configuration_vilavt import query_aware_block_indexes


def test_default_config_is_vilavt_7b_and_offline(monkeypatch):
    # Any hub access would need the network; make it fail loudly.
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("network access"))
    config = ViLaVTConfig()
    assert config.model_type == "vilavt"
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (3584, 28)
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (config.vision_config.hidden_size, config.vision_config.depth) == (1280, 32)
    assert config.vision_config.fullatt_block_indexes == [7, 15]
    assert config.vision_config.query_aware_blocks == list(range(16, 32))
    assert (config.text_encoder_config.hidden_size, config.text_encoder_config.vocab_size) == (1024, 151669)
    assert config.max_query_length == 50
    assert set(config.auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoProcessor"}


def test_reads_the_official_config_as_it_is():
    raw = json.loads((REFERENCE / "config.json").read_text())
    raw["architectures"] = ["Qwen2_5_VLForConditionalGeneration_Vilavt"]
    raw["model_type"] = "vilavt"
    config = ViLaVTConfig(**raw)
    assert config.vision_config.integration_point == "late"
    assert config.vision_config.fullatt_block_indexes == [1, 3]
    assert config.text_encoder_config.hidden_size == 32
    assert config.text_config.hidden_size == 64
    assert config.image_token_id == 5
    # Flat text fields duplicated at the top level are dropped in favour of text_config.
    assert "vocab_size" not in config.to_dict()
    assert ViLaVTConfig(**config.to_dict()).to_dict() == config.to_dict()


def test_flat_text_fields_without_text_config():
    raw = json.loads((REFERENCE / "config.json").read_text())
    raw.pop("text_config")
    config = ViLaVTConfig(**raw)
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (64, 2)
    assert config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]


@pytest.mark.parametrize(
    "point, expected",
    [
        ("all", list(range(32))),
        ("early", list(range(16))),
        ("late", list(range(16, 32))),
        ("late2", list(range(24, 32))),
        ("late3", list(range(8, 32))),
        ("sparse", [7, 15, 23, 31]),
    ],
)
def test_integration_points(point, expected):
    assert query_aware_block_indexes(point, 32, [7, 15, 23, 31]) == expected


def test_unknown_integration_point():
    with pytest.raises(ValueError, match="integration_point must be one of .* got 'middle'"):
        ViLaVTConfig(vision_config={"integration_point": "middle"})
