"""`ViLaVTModel.from_pretrained` (the model without its head) loads a ViLaVT checkpoint exactly, as stock
`Qwen2_5_VLModel.from_pretrained` loads a Qwen2.5-VL one."""

import pytest
import torch
from conftest import reference_case
from safetensors.torch import save_file

from vilavt import ViLaVTForConditionalGeneration, ViLaVTModel

INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "query_ids", "query_attention_mask")


@pytest.fixture(scope="module")
def checkpoints(reference_folder, reference_model, tmp_path_factory):
    """The official layout (the fixture), the project's own save, and transformers' native key names."""
    own = tmp_path_factory.mktemp("own")
    reference_model.save_pretrained(own)
    native = tmp_path_factory.mktemp("native")
    reference_model.config.save_pretrained(native)
    state = {k: v.contiguous() for k, v in reference_model.state_dict().items()}
    save_file(state, native / "model.safetensors", metadata={"format": "pt"})
    return {"official": reference_folder, "own save": own, "native": native}


@pytest.mark.parametrize("layout", ["official", "own save", "native"])
def test_base_model_loads_every_key(checkpoints, reference_model, layout):
    model, info = ViLaVTModel.from_pretrained(checkpoints[layout], output_loading_info=True)
    assert not any(info.values()), info
    expected = reference_model.model.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)

    case = reference_case("d")
    inputs = {k: case[k] for k in (*INPUTS, "image_to_query_mapping")}
    with torch.no_grad():
        ours = model.eval()(**inputs).last_hidden_state
        full = reference_model.model(**inputs).last_hidden_state
    assert torch.equal(ours, full)


def test_base_model_save_reloads(reference_folder, tmp_path):
    """The base model writes its own names, as stock Qwen2_5_VLModel does, and reads them back exactly."""
    model = ViLaVTModel.from_pretrained(reference_folder)
    model.save_pretrained(tmp_path)
    reloaded, info = ViLaVTModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.state_dict().items())
    # The full model reads every part of it but the head.
    _, info = ViLaVTForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"lm_head.weight"}
    assert not info["unexpected_keys"]
