"""How an image item reaches the vLLM model with its query, and what its hash covers.

An image item is a PIL image (encoded with the empty query: f0 = V(I, ∅)) or a dict

    {"image": PIL, "query": str}                                   encoded alone with its query
    {"image": PIL, "query": str, "joint": [PIL, ...], "joint_index": i}
                                                                   one of the images a call encodes
                                                                   jointly (`joint[i]` is `image`)

Each item is self-contained: besides its own pixels it carries its call's other images, so the
model can encode the whole group however vLLM's scheduler splits a prompt's items across encoder
batches (a prefix-cache hit may end between two crops of one call). The item's hash — the key of
vLLM's processor cache, encoder cache and prefix-cache blocks — covers exactly what its features
depend on: its image, its own query and its call's images; never the queries of other images, so
the prefix of a conversation keeps its hashes when the next round adds crops.
"""

import hashlib
from collections.abc import Mapping

import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems, ModalityDataItems
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo
from vllm.model_executor.models.qwen2_vl import Qwen2VLMultiModalDataParser

from ..remote_code.configuration_vilavt import ViLaVTConfig
from ..remote_code.processing_vilavt import ViLaVTProcessor

QUERY_KEYS = ("vilavt_queries", "vilavt_joint", "vilavt_joint_index")
AUTHORS_HASHING_KEY = "vilavt_hash_all_queries"  # see `authors_hashing_kwargs`


def normalise_item(item) -> dict:
    """An image item as a dict with `image`, `query`, `joint` and `joint_index`; a clear error otherwise."""
    if isinstance(item, Image.Image):
        item = {"image": item}
    if not isinstance(item, Mapping) or not isinstance(item.get("image"), Image.Image):
        raise ValueError(
            'a ViLaVT image item is a PIL image or {"image": PIL image, "query": str[, "joint": [PIL images], '
            f'"joint_index": int]}}, got {type(item).__name__}'
        )
    unknown = set(item) - {"image", "query", "joint", "joint_index"}
    if unknown:
        raise ValueError(f"unknown keys in a ViLaVT image item: {sorted(unknown)}")
    query = item.get("query") or ""
    if not isinstance(query, str):
        raise ValueError(f'"query" must be a string, got {type(query).__name__}')
    joint, index = item.get("joint"), item.get("joint_index")
    if joint is None:
        joint, index = [item["image"]], 0
    elif not isinstance(index, int) or not 0 <= index < len(joint) or joint[index] is not item["image"]:
        raise ValueError('"joint_index" must be the position of "image" in "joint"')
    image = item["image"].convert("RGB") if item["image"].mode != "RGB" else item["image"]
    joint = [image if j == index else (im.convert("RGB") if im.mode != "RGB" else im) for j, im in enumerate(joint)]
    return {"image": image, "query": query, "joint": joint, "joint_index": index}


class QueryImageItems(ImageProcessorItems):
    """Image items with their query and call group. `get` gives the image (what vLLM's size logic
    reads); indexing gives the whole item (what the processor cache re-parses on a miss); the hash
    material is the item."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items
        super().__init__([item["image"] for item in items])

    def __getitem__(self, index: int) -> dict:
        return self.items[index]

    def get_item_for_hash(self, index: int) -> dict:
        item = self.items[index]
        # The other images of a joint call are part of what the features depend on.
        return {"image": item["image"], "query": item["query"], "joint": item["joint"], "joint_index": item["joint_index"]}

    def get_processor_data(self) -> Mapping[str, object]:
        return {
            "images": [item["image"] for item in self.items],
            "vilavt_queries": [item["query"] for item in self.items],
            "vilavt_joint": [item["joint"] for item in self.items],
            "vilavt_joint_index": [item["joint_index"] for item in self.items],
        }


class ViLaVTDataParser(Qwen2VLMultiModalDataParser):
    def _parse_image_data(self, data) -> ModalityDataItems | None:
        if data is None or isinstance(data, (torch.Tensor,)) or (isinstance(data, Mapping) and "image" not in data):
            return super()._parse_image_data(data)  # precomputed embeddings
        items = data if isinstance(data, (list, tuple)) else [data]
        return QueryImageItems([normalise_item(item) for item in items])


class ViLaVTProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_hf_config(self):
        return self.ctx.get_hf_config(ViLaVTConfig)

    def get_hf_processor(self, **kwargs: object) -> ViLaVTProcessor:
        kwargs = {k: v for k, v in kwargs.items() if k != AUTHORS_HASHING_KEY}
        return self.ctx.get_hf_processor(ViLaVTProcessor, **kwargs)

    def get_supported_mm_limits(self):
        return {"image": None}  # ViLaVT has no video path (REFERENCE.md §1.4)

    def get_data_parser(self):
        return ViLaVTDataParser(
            self.get_hf_config().vision_config.spatial_merge_size,
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )


def _group_key(query: str, pixels: list[torch.Tensor], grids: list[list[int]]) -> torch.Tensor:
    """16 bytes naming a call group's content (query and every member's pixels), as two int64: items of
    one group found in one encoder batch are encoded once."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(query.encode())
    for rows, grid in zip(pixels, grids):
        digest.update(str(grid).encode())
        digest.update(rows.contiguous().view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.int64).clone()


def add_query_fields(processor, outputs, queries=None, joints=None, indices=None):
    """Add to the image processor's `outputs` (pixel_values, image_grid_thw of N images) what the vLLM
    model reads per image: `query_ids` / `query_attention_mask` [N, T], the call's other images
    (`joint_pixel_values`, `joint_grid_thw`: one entry per image), `joint_index` [N] and `joint_key` [N, 2]."""
    count = len(outputs["image_grid_thw"])
    queries = queries or [""] * count
    joints = joints or [None] * count
    indices = indices or [0] * count
    encoding, _ = processor.tokenize_queries(queries)
    grids = outputs["image_grid_thw"].tolist()
    own = outputs["pixel_values"].split([t * h * w for t, h, w in grids])
    joint_pixels, joint_grids, keys = [], [], []
    for i in range(count):
        others = [im for j, im in enumerate(joints[i] or []) if j != indices[i]]
        if others:
            extra = processor.image_processor(images=others, size=processor.size_keeping(others), return_tensors="pt")
            pixels, other_grids = extra["pixel_values"].to(own[i].dtype), extra["image_grid_thw"]
        else:
            pixels, other_grids = own[i].new_zeros(0, own[i].shape[1]), torch.zeros(0, 3, dtype=torch.long)
        joint_pixels.append(pixels)
        joint_grids.append(other_grids)
        members = list(pixels.split([t * h * w for t, h, w in other_grids.tolist()]))
        member_grids = other_grids.tolist()
        members.insert(indices[i], own[i])
        member_grids.insert(indices[i], grids[i])
        keys.append(_group_key(queries[i], members, member_grids))
    outputs.pop("image_to_query_mapping", None)
    outputs["query_ids"] = encoding["query_ids"]
    outputs["query_attention_mask"] = encoding["query_attention_mask"]
    outputs["joint_pixel_values"] = joint_pixels
    outputs["joint_grid_thw"] = joint_grids
    outputs["joint_index"] = torch.tensor(indices, dtype=torch.long)
    outputs["joint_key"] = torch.stack(keys)
    return outputs


class ViLaVTMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor plus, per image, its query tokens and its call's other images."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        hf_data = dict(hf_data)
        extra = {key: hf_data.pop(key, None) for key in QUERY_KEYS}
        if hf_data.get("images"):
            # The items are displayed-size already (the loop's originals and crops): the processor must not
            # fit them again (its rule would treat every image of vLLM's dummy text as an original).
            hf_data["images_sized"] = True
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != AUTHORS_HASHING_KEY}
        outputs = super()._call_hf_processor(hf_data, hf_kwargs)
        outputs.pop("originals", None)  # what the transformers loop crops from; the vLLM loop keeps its own
        if "image_grid_thw" not in outputs:
            return outputs
        processor = self.info.get_hf_processor(**hf_kwargs)
        return add_query_fields(
            processor, outputs, extra["vilavt_queries"], extra["vilavt_joint"], extra["vilavt_joint_index"]
        )

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return dict(
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            query_ids=MultiModalFieldConfig.batched("image"),
            query_attention_mask=MultiModalFieldConfig.batched("image"),
            joint_pixel_values=MultiModalFieldConfig.batched("image"),
            joint_grid_thw=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            joint_index=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            joint_key=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        )


def authors_hashing_kwargs(queries: list[str]) -> dict:
    """`mm_processor_kwargs` that fold every query of a conversation into every image's hash, as the
    authors' vLLM plugin does (it passes all query tensors with the prompt): the processor ignores them,
    vLLM hashes them. Only for measuring what that hashing costs (bench/vllm_loop.py, tests)."""
    return {AUTHORS_HASHING_KEY: list(queries)}


__all__ = [
    "QueryImageItems",
    "ViLaVTDataParser",
    "ViLaVTProcessingInfo",
    "ViLaVTMultiModalProcessor",
    "normalise_item",
    "add_query_fields",
    "authors_hashing_kwargs",
]
