"""What the query does and does not influence, and batching several conversations in one call."""

import torch
from conftest import image_features, query_inputs, reference_case


def empty_query_features(model, case):
    """Case b's images grouped as in the case, with its all-padding (empty) query rows."""
    return image_features(
        model, case["pixel_values"], case["image_grid_thw"], query_ids=case["empty_query_ids"],
        query_attention_mask=case["empty_query_attention_mask"], image_to_query_mapping=case["image_to_query_mapping"],
    )  # fmt: skip


def test_the_query_changes_the_features(reference_model):
    case = reference_case("b")
    with_query = image_features(reference_model, case["pixel_values"], case["image_grid_thw"], **query_inputs(case))
    empty = empty_query_features(reference_model, case)
    assert (with_query - empty).abs().max() > 0.1


def test_no_query_tensors_means_empty_queries(reference_model):
    """f0 = V(I, ∅): omitting the query tensors equals one empty query per image (case A)."""
    case = reference_case("a")
    ours = image_features(reference_model, case["pixel_values"], case["image_grid_thw"])
    torch.testing.assert_close(ours, case["image_embeds"], atol=1e-4, rtol=1e-4)


def test_changing_one_query_leaves_other_groups_bit_identical(reference_model):
    case = reference_case("e")  # mapping [0, 1, 2, 2]; images 2 and 3 share query 2
    tokens = case["image_grid_thw"].prod(-1) // 4
    image_of_row = torch.repeat_interleave(torch.arange(len(tokens)), tokens)
    base = image_features(reference_model, case["pixel_values"], case["image_grid_thw"], **query_inputs(case))
    for row, affected in ((2, {2, 3}), (1, {1})):
        changed = query_inputs(case)
        changed["query_ids"] = case["query_ids"].clone()
        changed["query_ids"][row] = (changed["query_ids"][row] + 7) % 96
        other = image_features(reference_model, case["pixel_values"], case["image_grid_thw"], **changed)
        for image in range(len(tokens)):
            rows = image_of_row == image
            if image in affected:
                assert not torch.equal(other[rows], base[rows])
            else:
                assert torch.equal(other[rows], base[rows])


def test_a_batch_of_conversations_equals_each_alone(reference_model):
    """Two conversations with different numbers of images (3, 4) and queries (2, 3) in one call, batched by the
    one batching function (`batch_vision`: query rows padded, the second mapping offset by the first's rows)."""
    from vilavt.remote_code.processing_vilavt import batch_vision

    first, second = reference_case("c"), reference_case("e")
    batch = batch_vision([{**query_inputs(c), "pixel_values": c["pixel_values"], "image_grid_thw": c["image_grid_thw"]}
                          for c in (first, second)])
    assert batch["image_to_query_mapping"].tolist() == first["image_to_query_mapping"].tolist() + (
        second["image_to_query_mapping"] + first["query_ids"].shape[0]).tolist()
    batched = image_features(reference_model, batch.pop("pixel_values"), batch.pop("image_grid_thw"), **batch)
    alone = torch.cat(
        [
            image_features(reference_model, c["pixel_values"], c["image_grid_thw"], **query_inputs(c))
            for c in (first, second)
        ]
    )
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        batched, torch.cat([first["image_embeds"], second["image_embeds"]]), atol=1e-4, rtol=1e-4
    )


def test_images_sharing_an_empty_query_attend_jointly(reference_model):
    """A mapping without query text groups images (joint encoding, no query tokens)."""
    case = reference_case("b")
    joint = image_features(
        reference_model, case["pixel_values"], case["image_grid_thw"], image_to_query_mapping=torch.tensor([0, 0])
    )
    separate = image_features(reference_model, case["pixel_values"], case["image_grid_thw"])
    empty_joint = empty_query_features(reference_model, case)
    torch.testing.assert_close(joint, empty_joint)
    assert (joint - separate).abs().max() > 1e-3



def test_dense_attention_mask_equals_the_query_groups(reference_model):
    """`QueryGroups.attention_mask()`, one dense mask over cat([image keys, query keys]), gives what the QA
    attention computes group by group (case E: a query shared by two images, left padding, an empty query)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    case = reference_case("e")
    model = reference_model.model
    instruct_embeds, instruct_mask = model._query_features(
        len(case["image_grid_thw"]), case["query_ids"], case["query_attention_mask"], case["image_to_query_mapping"]
    )
    mapping = case["image_to_query_mapping"]
    groups = model.visual.query_groups(case["image_grid_thw"], mapping, instruct_embeds, instruct_mask)
    assert groups.query_embeds is not None and len(set(groups.q_lengths)) > 1
    attn = model.visual.blocks[model.config.vision_config.query_aware_blocks[0]].attn
    hidden = torch.randn(len(groups.position_ids), attn.dim, generator=torch.Generator().manual_seed(0))
    cos, sin = model.visual.rotary_pos_emb(hidden, groups.position_ids)
    with torch.no_grad():
        grouped = attn(hidden, position_embeddings=(cos, sin), query_groups=groups)
        query, key, value = attn.qkv(hidden).reshape(len(hidden), 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
        query_key, query_value = attn.query_keys_values(groups)
        dense = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(0, 1),
            torch.cat([key, query_key]).transpose(0, 1),
            torch.cat([value, query_value]).transpose(0, 1),
            attn_mask=groups.attention_mask(),
        )
        dense = attn.proj(dense.transpose(0, 1).reshape(len(hidden), -1))
    torch.testing.assert_close(dense, grouped, atol=1e-5, rtol=1e-5)


def test_query_groups_are_a_pure_function_of_grid_mapping_and_mask():
    """No model needed (the vLLM model calls this): two images share query 0, one has query 1 (left-padded)."""
    from vilavt.remote_code.modeling_vilavt import build_query_groups

    grid = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 2, 2]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    groups = build_query_groups(grid, 2, torch.tensor([0, 0, 1]), mask)
    # Image 1 starts where image 0 ends (max(h, w) = 2); image 2 opens its own group at 0.
    assert groups.position_ids[:4].max() == 1 and groups.position_ids[4:12].min() == 2
    assert groups.position_ids[12:].min() == 0 and groups.position_ids[12:].max() == 1
    # Query slots follow the last image of their group: 2 + 4 = 6 and 2 (slots 1, 2 of a padded row).
    assert groups.query_position_ids.tolist() == [6, 7, 3, 4]
    assert (groups.q_lengths, groups.k_lengths) == ([12, 4], [14, 6])
    assert groups.cu_seqlens_k.tolist() == [0, 14, 20] and groups.cu_seqlens_q.dtype == torch.int32
    assert groups.kv_index.tolist() == [*range(12), 16, 17, *range(12, 16), 18, 19]
    mask = groups.attention_mask()
    assert mask.shape == (16, 20)
    assert mask[:12, :12].all() and mask[:12, 16:18].all() and not mask[:12, 12:16].any() and not mask[:12, 18:].any()
    assert mask[12:, 12:16].all() and mask[12:, 18:].all() and not mask[12:, :12].any() and not mask[12:, 16:18].any()
    # Without a mapping or queries: each image alone, no query keys.
    alone = build_query_groups(grid, 2)
    assert alone.q_lengths == alone.k_lengths == [4, 8, 4] and alone.kv_index is None
    assert alone.position_ids[4:12].min() == 0
