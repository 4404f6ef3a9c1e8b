"""Building ViLaVT checkpoint folders shard by shard (memory stays near one shard).

* `init_from_base`: Qwen2.5-VL + a Qwen3 text encoder (e.g. Qwen2.5-VL-7B-Instruct + Qwen3-Embedding-0.6B)
  -> a ViLaVT starting checkpoint for SFT: the new query-path weights (`text_proj`, the per-block
  `instruct_key_proj` / `instruct_value_proj`) are initialised like the reference (normal(0, 0.02), zero
  bias), everything else is copied.
* `convert_official`: an official ViLaVT checkpoint (the authors' config and key layout, including the
  v3/v4 names `instruct_k_proj` / `instruct_v_proj`) -> a plug-in folder that loads with
  `trust_remote_code=True`.

Folders are written in the official key layout (`visual.*`, `model.*`, `lm_head.*`, `text_encoder.*`,
`text_proj.*`), with the remote code, `auto_map`, the processor and the query tokenizer bundled.
"""

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import errors_named
from .remote_code import modeling_vilavt
from .remote_code.configuration_vilavt import ViLaVTConfig
from .remote_code.prompts_vilavt import PROMPTS_FILE
from .validation import check_model_folder, check_weight_shapes

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, sharded (with an index) or single."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{folder}: no model.safetensors or {INDEX_NAME}")


def official_key(key: str) -> str:
    """A Qwen2.5-VL key in the official (pre-4.52) layout, whichever layout it was saved in."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if key.startswith(new):
            return old + key[len(new) :]
    return key


class ShardWriter:
    """Writes tensors into numbered shards and the index that maps every key to its shard."""

    def __init__(self, folder: Path, total_shards_hint: int):
        self.folder, self.total = Path(folder), max(total_shards_hint, 1)
        self.weight_map: dict[str, str] = {}
        self.count, self.size = 0, 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        self.count += 1
        name = f"model-{self.count:05d}-of-{self.total:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, self.folder / name, metadata={"format": "pt"})
        self.size += sum(t.numel() * t.element_size() for t in tensors.values())
        self.weight_map.update(dict.fromkeys(tensors, name))

    def finish(self) -> None:
        # Shards were numbered before their count was final; rename them so the names agree.
        renamed = {}
        for i in range(1, self.count + 1):
            old = f"model-{i:05d}-of-{self.total:05d}.safetensors"
            new = f"model-{i:05d}-of-{self.count:05d}.safetensors"
            if old != new:
                (self.folder / old).rename(self.folder / new)
            renamed[old] = new
        weight_map = {k: renamed[v] for k, v in sorted(self.weight_map.items())}
        index = {"metadata": {"total_size": self.size}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


# Old (v3/v4) names of the query projections, and keys the model never used.
RENAMES = ((".instruct_k_proj.", ".instruct_key_proj."), (".instruct_v_proj.", ".instruct_value_proj."))
UNUSED = ("visual.sep_token_embedding.weight",)


def expected_keys(config: ViLaVTConfig) -> set[str]:
    """The state-dict keys of `config`'s model, in the official layout (computed on the meta device)."""
    from .remote_code.modeling_vilavt import ViLaVTForConditionalGeneration

    with torch.device("meta"):
        model = ViLaVTForConditionalGeneration(config)
    prefixes = (("model.visual.", "visual."), ("model.language_model.", "model."), ("model.text_encoder.", "text_encoder."), ("model.text_proj.", "text_proj."))
    keys = set()
    for key in model.state_dict():
        for new, old in prefixes:
            if key.startswith(new):
                key = old + key[len(new) :]
                break
        keys.add(key)
    if config.tie_word_embeddings:
        keys.discard("lm_head.weight")
    return keys


def remote_code_files() -> list[Path]:
    """The remote-code modules a checkpoint carries: `modeling_vilavt.py` and every module it imports
    relatively (the package's own files, never copies of them in git)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    modeling = Path(modeling_vilavt.__file__)
    return sorted([modeling, *map(Path, get_relative_import_files(str(modeling)))])


def copy_remote_code(folder: Path) -> None:
    for path in remote_code_files():
        shutil.copy(path, Path(folder) / path.name)


def _query_path_weights(config: ViLaVTConfig, seed: int) -> dict[str, torch.Tensor]:
    """`text_proj` and the instruct projections, initialised as the reference's `_init_weights` does."""
    generator = torch.Generator().manual_seed(seed)
    std = config.vision_config.initializer_range
    width, text_width = config.vision_config.hidden_size, config.text_encoder_config.hidden_size

    def linear(prefix, fan_out, fan_in):
        return {
            f"{prefix}.weight": torch.randn(fan_out, fan_in, generator=generator) * std,
            f"{prefix}.bias": torch.zeros(fan_out),
        }

    tensors = linear("text_proj", width, text_width)
    for block in config.vision_config.query_aware_blocks:
        for name in ("instruct_key_proj", "instruct_value_proj"):
            tensors.update(linear(f"visual.blocks.{block}.attn.{name}", width, width))
    return tensors


def init_from_base(
    base,
    encoder,
    out,
    integration_point: str = "late",
    fullatt_block_indexes=(7, 15),
    max_query_length: int = 50,
    dtype: str | None = None,
    seed: int = 0,
) -> Path:
    """Assemble a ViLaVT checkpoint from a Qwen2.5-VL folder and a Qwen3 (embedding) model folder."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .remote_code.processing_vilavt import ViLaVTProcessor

    base, encoder, out = Path(base), Path(encoder), Path(out)
    # Inputs are checked before anything is written (one-line errors naming the file).
    base_config = check_model_folder(base, "Qwen2.5-VL folder", tokenizer=True)
    encoder_config = check_model_folder(encoder, "Qwen3 encoder folder", tokenizer=True)
    out.mkdir(parents=True, exist_ok=True)
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        base_config.pop(key, None)
        encoder_config.pop(key, None)
    vision = dict(base_config.pop("vision_config", {}))
    vision.pop("model_type", None)
    vision.update(integration_point=integration_point, fullatt_block_indexes=list(fullatt_block_indexes))
    with errors_named(f"{base / 'config.json'} with {encoder / 'config.json'}: invalid config"):
        config = ViLaVTConfig(
            **base_config, vision_config=vision, text_encoder_config=encoder_config, max_query_length=max_query_length
        )
    config.architectures = ["ViLaVTForConditionalGeneration"]
    if dtype:
        config.dtype = getattr(torch, dtype)

    cast = (lambda t: t.to(getattr(torch, dtype))) if dtype else (lambda t: t)
    base_shards, encoder_shards = shard_files(base), shard_files(encoder)
    writer = ShardWriter(out, len(base_shards) + len(encoder_shards) + 1)
    for path in base_shards:
        with safe_open(path, "pt") as shard:
            writer.write({official_key(k): cast(shard.get_tensor(k)) for k in shard.keys()})
    for path in encoder_shards:
        with safe_open(path, "pt") as shard:
            # A bare Qwen3Model, or a causal LM whose backbone is under `model.` (its head is not needed).
            writer.write(
                {
                    "text_encoder." + k.removeprefix("model."): cast(shard.get_tensor(k))
                    for k in shard.keys()
                    if not k.startswith("lm_head.")
                }
            )
    writer.write({k: cast(v) for k, v in _query_path_weights(config, seed).items()})
    writer.finish()
    config.save_pretrained(out)
    copy_remote_code(out)
    for name in ("generation_config.json",):
        if (base / name).exists():
            shutil.copy(base / name, out / name)

    tokenizer = AutoTokenizer.from_pretrained(base)
    query_tokenizer = AutoTokenizer.from_pretrained(encoder)
    query_tokenizer.padding_side = "right"  # what the reference trained with (REFERENCE.md §1.5)
    preprocessor = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (base / name).exists():
            preprocessor = json.loads((base / name).read_text())
            preprocessor = preprocessor.get("image_processor", preprocessor)
            break
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=preprocessor.get("min_pixels", 4 * 28 * 28), max_pixels=preprocessor.get("max_pixels", 8192 * 28 * 28)
    )
    processor = ViLaVTProcessor(image_processor, tokenizer, query_tokenizer, max_query_length=max_query_length)
    processor.save_pretrained(out)
    logger.info("wrote %s (%d shards)", out, writer.count)
    return out


def derived_query_tokenizer(tokenizer, max_length: int = 50):
    """A Qwen3-Embedding-style query tokenizer from a Qwen2.5 tokenizer: the byte-level BPE is shared, so
    only the behaviour differs — `<|endoftext|>` appended to every query, right padding with it."""
    import copy

    from tokenizers import processors

    query = copy.deepcopy(tokenizer)
    eos = query.convert_tokens_to_ids("<|endoftext|>")
    query._tokenizer.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)])
    query.pad_token, query.padding_side, query.model_max_length = "<|endoftext|>", "right", max_length
    return query


def convert_official(src, dst, tokenizer=None, query_tokenizer=None, prompts=None) -> Path:
    """Convert an official ViLaVT checkpoint folder into a plug-in folder, shard by shard.

    `tokenizer` / `query_tokenizer`: folders to take them from when `src` has none (the official folders
    carry the Qwen2.5-VL tokenizer but not the Qwen3-Embedding one; without `query_tokenizer` it is
    derived from the main tokenizer, which shares its vocabulary). `prompts`: the prompt templates the
    folder carries (`vilavt.prompts.import_authors_prompts`: the wording the released model was trained
    on); default: the project's own wording.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .remote_code.processing_vilavt import ViLaVTProcessor

    src, dst = Path(src), Path(dst)
    raw = check_model_folder(src, "checkpoint folder")  # before anything is written: one-line errors naming the file
    raw.pop("auto_map", None)
    with errors_named(f"{src / 'config.json'}: invalid config"):
        config = ViLaVTConfig(**raw)
    check_weight_shapes(src, config)
    config.architectures = ["ViLaVTForConditionalGeneration"]
    dst.mkdir(parents=True, exist_ok=True)
    expected, seen = expected_keys(config), set()
    shards = shard_files(src)
    writer = ShardWriter(dst, len(shards))
    for path in shards:
        tensors = {}
        with safe_open(path, "pt") as shard:
            for key in shard.keys():
                name = official_key(key)
                for old, new in RENAMES:
                    name = name.replace(old, new)
                if name in UNUSED:
                    continue
                tensors[name] = shard.get_tensor(key)
        seen |= tensors.keys()
        writer.write(tensors)
        del tensors
    missing, unexpected = sorted(expected - seen), sorted(seen - expected)
    if missing or unexpected:
        raise ValueError(
            f"{src} does not match its config: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    writer.finish()
    config.save_pretrained(dst)
    copy_remote_code(dst)
    if (src / "generation_config.json").exists():
        shutil.copy(src / "generation_config.json", dst / "generation_config.json")

    if prompts is not None:  # with no processor below, a processor added later reads them
        prompts.save(dst / PROMPTS_FILE)
    tokenizer_source = Path(tokenizer) if tokenizer else src
    if not (tokenizer_source / "tokenizer_config.json").exists():
        logger.warning("no tokenizer in %s: the folder has weights and config but no processor", tokenizer_source)
        return dst
    main_tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, config=config)
    if query_tokenizer:
        queries = AutoTokenizer.from_pretrained(query_tokenizer)
        queries.padding_side = "right"
    else:
        queries = derived_query_tokenizer(main_tokenizer, config.max_query_length)
    preprocessor = {}
    for source in (src, tokenizer_source):
        if (source / "preprocessor_config.json").exists():
            preprocessor = json.loads((source / "preprocessor_config.json").read_text())
            break
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=preprocessor.get("min_pixels", 4 * 28 * 28), max_pixels=preprocessor.get("max_pixels", 8192 * 28 * 28)
    )
    processor = ViLaVTProcessor(
        image_processor, main_tokenizer, queries, max_query_length=config.max_query_length, prompt_templates=prompts
    )
    processor.save_pretrained(dst)
    return dst
