"""Malformed query / image inputs raise a ValueError naming the field and the numbers."""

import pytest
import torch
from conftest import image_features, query_inputs, reference_case


@pytest.fixture(scope="module")
def case_c():
    return reference_case("c")  # 3 images, 2 query rows, mapping [0, 1, 1]


def encode(model, case, **overrides):
    return image_features(model, case["pixel_values"], case["image_grid_thw"], **{**query_inputs(case), **overrides})


@pytest.mark.parametrize(
    "mapping, message",
    [
        ([0, 1], r"image_to_query_mapping has 2 entries but image_grid_thw describes 3 images"),
        ([0, 1, 1, 1], r"image_to_query_mapping has 4 entries but image_grid_thw describes 3 images"),
        ([0, 1, 2], r"image_to_query_mapping\[2\] = 2 points to a missing query row \(query_ids has 2 rows\)"),
        ([0, 1, -1], r"image_to_query_mapping\[2\] = -1 points to a missing query row"),
        ([1, 0, 1], r"must be non-decreasing.*entry 1 is 0 after 1"),
        ([0, 1, 0], r"must be non-decreasing.*entry 2 is 0 after 1"),
    ],
)
def test_bad_mapping(reference_model, case_c, mapping, message):
    with pytest.raises(ValueError, match=message):
        encode(reference_model, case_c, image_to_query_mapping=torch.tensor(mapping))


def test_query_rows_longer_than_the_limit(reference_model, case_c):
    limit = reference_model.config.max_query_length
    ids = torch.zeros(2, limit + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"query_ids rows have {limit + 1} tokens .* max_query_length={limit}"):
        encode(reference_model, case_c, query_ids=ids, query_attention_mask=torch.ones_like(ids))


def test_query_mask_shape_mismatch(reference_model, case_c):
    with pytest.raises(ValueError, match=r"query_attention_mask has shape \(2, 5\) but query_ids has shape \(2, 6\)"):
        encode(reference_model, case_c, query_attention_mask=case_c["query_attention_mask"][:, :5])


def test_image_tokens_must_match_image_features(reference_model):
    case = reference_case("d")
    input_ids = case["input_ids"].clone()
    input_ids[0, 5] = 44  # one image placeholder fewer than the 22 features
    with pytest.raises(ValueError, match=r"Image features and image tokens do not match, tokens: 21, features: 22"):
        reference_model(
            input_ids=input_ids,
            pixel_values=case["pixel_values"],
            image_grid_thw=case["image_grid_thw"],
            query_ids=case["query_ids"],
            query_attention_mask=case["query_attention_mask"],
            image_to_query_mapping=case["image_to_query_mapping"],
        )


def test_missing_grid(reference_model, case_c):
    with pytest.raises(ValueError, match="image_grid_thw is required"):
        reference_model.get_image_features(case_c["pixel_values"], None)
