"""Our classes, loaded from the official key layout, compute the reference model's function.

Golden tensors come from the authors' code on tiny random weights (tests/fixtures/reference-parity,
README inside). Tolerance atol = rtol = 1e-4 as the fixture suggests.
"""

import json

import pytest
import torch
from conftest import REFERENCE, image_features, query_inputs, reference_case
from safetensors import safe_open

from vilavt import ViLaVTForConditionalGeneration

TOL = dict(atol=1e-4, rtol=1e-4)
VISION_CASES = ["a", "b", "c", "e"]


def case_features(model, case, **overrides):
    return image_features(model, case["pixel_values"], case["image_grid_thw"], **{**query_inputs(case), **overrides})


def test_official_layout_loads_strictly(reference_folder):
    model, info = ViLaVTForConditionalGeneration.from_pretrained(reference_folder, output_loading_info=True)
    assert not any(info.values()), info
    official = {entry["name"] for entry in json.loads((REFERENCE / "keys.json").read_text())}
    ours = {k for k in model.state_dict() if "rotary" not in k}
    assert len(ours) == len(official)
    assert model.config.vision_config.query_aware_blocks == [2, 3]


@pytest.mark.parametrize("name", VISION_CASES)
def test_image_embeddings_match_reference(reference_model, name):
    case = reference_case(name)
    torch.testing.assert_close(case_features(reference_model, case), case["image_embeds"], **TOL)


def test_empty_query_variant_matches_reference(reference_model):
    case = reference_case("b")
    ours = case_features(
        reference_model, case, query_ids=case["empty_query_ids"], query_attention_mask=case["empty_query_attention_mask"]
    )
    torch.testing.assert_close(ours, case["image_embeds_empty_query"], **TOL)


def test_logits_match_reference(reference_model):
    case = reference_case("d")
    with torch.no_grad():
        out = reference_model(
            input_ids=case["input_ids"],
            attention_mask=case["attention_mask"],
            pixel_values=case["pixel_values"],
            image_grid_thw=case["image_grid_thw"],
            query_ids=case["query_ids"],
            query_attention_mask=case["query_attention_mask"],
            image_to_query_mapping=case["image_to_query_mapping"],
        )
    torch.testing.assert_close(out.logits, case["logits"], **TOL)


@pytest.mark.parametrize("name", VISION_CASES)
def test_rotary_positions_match_reference(reference_model, name):
    """Per-patch (row, col) ids with the per-group diagonal offsets, and the query-slot positions."""
    case = reference_case(name)
    mask = case["query_attention_mask"]
    embeds = torch.zeros(*mask.shape, reference_model.config.vision_config.hidden_size)
    groups = reference_model.model.visual.query_groups(
        case["image_grid_thw"], case["image_to_query_mapping"], embeds, mask
    )
    positions = groups.position_ids
    assert torch.equal(positions, case["debug.rotary_pos_ids"])
    assert groups.q_lengths == torch.diff(case["debug.block3_cu_seqlens_q"]).tolist()
    assert groups.k_lengths == torch.diff(case["debug.block3_cu_seqlens_k"]).tolist()
    if mask.any():
        # Rotary of the query keys at the reference's slot positions (both axes = one scalar).
        expected = case["debug.query_pos_ids"][mask.bool()]
        cos, _ = reference_model.model.visual.rotary_pos_emb(embeds, torch.stack([expected, expected], -1))
        torch.testing.assert_close(groups.query_cos, cos)


def test_query_features_match_reference(reference_model):
    """Text encoder + text_proj on left-padded rows and an empty row (case E); only valid slots count."""
    case = reference_case("e")
    mask = case["query_attention_mask"].bool()
    with torch.no_grad():
        ours = reference_model.model.encode_queries(case["query_ids"], case["query_attention_mask"])
    torch.testing.assert_close(ours[mask], case["debug.instruct_embeds"][mask], **TOL)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_parity_holds_for_each_attention_backend(reference_folder, attn_implementation):
    model = ViLaVTForConditionalGeneration.from_pretrained(
        reference_folder, attn_implementation=attn_implementation
    ).eval()
    assert model.model.visual.config._attn_implementation == attn_implementation
    for name in ("c", "e"):
        case = reference_case(name)
        torch.testing.assert_close(case_features(model, case), case["image_embeds"], **TOL)


def test_packed_varlen_path_matches_reference(reference_folder):
    """The flash-attention path packs image and query keys per group (cu_seqlens_q != cu_seqlens_k).
    flash-attn needs a GPU, so a float32 CPU kernel with flash_attn_varlen_func semantics stands in."""
    from transformers import AttentionInterface

    def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        cu_q, cu_k = kwargs["cu_seq_lens_q"].tolist(), kwargs["cu_seq_lens_k"].tolist()
        outputs = []
        for (q0, q1), (k0, k1) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
            weights = (query[:, :, q0:q1] @ key[:, :, k0:k1].transpose(-1, -2) * scaling).softmax(-1)
            outputs.append(weights @ value[:, :, k0:k1])
        return torch.cat(outputs, dim=2).transpose(1, 2), None

    AttentionInterface.register("flash_varlen_cpu_reference", varlen_reference)
    model = ViLaVTForConditionalGeneration.from_pretrained(reference_folder).eval()
    model.model.visual.config._attn_implementation = "flash_varlen_cpu_reference"
    for name in VISION_CASES:
        case = reference_case(name)
        torch.testing.assert_close(case_features(model, case), case["image_embeds"], **TOL)


def test_save_pretrained_writes_the_official_layout(reference_model, tmp_path):
    reference_model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    official = {entry["name"] for entry in json.loads((REFERENCE / "keys.json").read_text())}
    assert saved == official
    reloaded = ViLaVTForConditionalGeneration.from_pretrained(tmp_path).eval()
    case = reference_case("b")
    torch.testing.assert_close(case_features(reloaded, case), case["image_embeds"], **TOL)
