"""Checks of the files a user hands the project, before anything loads them: each problem is one
`InputError` line naming the file (text that is not UTF-8, invalid JSON, unreadable or wrong-shape
safetensors, a config field of the wrong type, a checkpoint folder without its tokenizer)."""

import json
import logging
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, errors_named

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def read_text(path, error: type[InputError] = InputError) -> str:
    """A UTF-8 text file (a byte-order mark is allowed); an `error` naming the file for anything else."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise error(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}, line {line}); "
            "save it as UTF-8"
        ) from None


def decode_json(text: str, where, line_offset: int = 0, error: type[InputError] = InputError):
    """`json.loads`; invalid JSON is an `error` naming `where`, the line and the column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = err.lineno + line_offset
        raise error(f"{where}: invalid JSON at line {line}, column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply (near line {line_offset + 1})") from None


def read_json(path, kind: type | None = None):
    """A JSON file's value (optionally required to be a `kind`, e.g. dict); `InputError` naming the file."""
    value = decode_json(read_text(path), str(path))
    if kind is not None and not isinstance(value, kind):
        expected = "an object" if kind is dict else ("a list" if kind is list else kind.__name__)
        raise InputError(f"{path}: expected {expected} at the top level, got {type(value).__name__}")
    return value


def weight_files(folder) -> list[Path]:
    """The safetensors files of a folder: the shards its index names (each must exist), else its *.safetensors."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = read_json(index, dict).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{index}: `weight_map` must map weight names to shard file names")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise InputError(f"{index}: names shard(s) that do not exist: {', '.join(missing)}")
        return files
    return sorted(folder.glob("*.safetensors"))


def weight_shapes(files) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers (no data is read); a truncated or corrupt file is an
    `InputError` naming it."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for path in files:
        try:
            with safe_open(path, "pt") as weights:
                shapes.update({key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()})
        except SafetensorError as err:
            raise InputError(f"{path}: not a readable safetensors file (truncated or corrupt: {err})") from None
    return shapes


def check_model_folder(folder, what: str = "model folder", tokenizer: bool = False) -> dict:
    """A Hugging Face model folder: it exists, its config.json is a JSON object, its safetensors files are
    readable and, with `tokenizer`, it has tokenizer files. Returns the config dict."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such {what}")
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a {what} (no config.json)")
    config = read_json(folder / "config.json", dict)
    weight_shapes(weight_files(folder))
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{folder}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the base model's tokenizer files into it"
        )
    return config


def check_weight_shapes(folder, config) -> None:
    """The folder's weights have the shapes of the model `config` (a `ViLaVTConfig`) builds, keys renamed as
    `from_pretrained` renames them (official layout, old names); a config the model cannot be built from or a
    mismatch is an `InputError`. Quantized checkpoints (packed weights) and absent keys are not checked."""
    import torch
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    from .remote_code.modeling_vilavt import ViLaVTForConditionalGeneration

    folder = Path(folder)
    if getattr(config, "quantization_config", None) is not None:
        return
    with errors_named(f"{folder / 'config.json'}: invalid config"), torch.device("meta"):
        model = ViLaVTForConditionalGeneration(config)
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    expected = model.state_dict()
    mismatched = []
    for key, shape in weight_shapes(weight_files(folder)).items():
        name, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if name in expected and tuple(expected[name].shape) != shape:
            mismatched.append((key, shape, tuple(expected[name].shape)))
    if mismatched:
        key, found, needed = mismatched[0]
        raise InputError(
            f"{folder}: {len(mismatched)} weight(s) do not have the shape config.json gives them, e.g. {key} is "
            f"{list(found)}, the config needs {list(needed)}"
        )


def check_checkpoint(folder) -> None:
    """A ViLaVT checkpoint folder, before it is loaded: config.json builds a `ViLaVTConfig` (fields of the right
    types) and the model; the weights' headers are readable and their shapes are the config's; the tokenizer
    and processor files load. Missing weights are left to the loader (it refuses or warns)."""
    from .remote_code.configuration_vilavt import ViLaVTConfig
    from .remote_code.processing_vilavt import ViLaVTProcessor

    folder = Path(folder)
    check_model_folder(folder, "checkpoint folder", tokenizer=True)
    with errors_named(f"{folder / 'config.json'}: invalid config"):
        config = ViLaVTConfig.from_pretrained(folder)
    check_weight_shapes(folder, config)
    with errors_named(f"{folder}: the tokenizer or processor files cannot be loaded"):
        ViLaVTProcessor.from_pretrained(folder)


@contextmanager
def loading_model(name):
    """Around loading the model `name`: a checkpoint folder is checked first (`check_checkpoint`: one-line
    errors before anything loads or prints), and whatever still fails while loading it becomes an
    `InputError` naming it."""
    name = str(name)
    if Path(name).is_dir():
        check_checkpoint(name)
    with errors_named(f"cannot load the model {name}"):
        yield


__all__ = [
    "read_text",
    "decode_json",
    "read_json",
    "weight_files",
    "weight_shapes",
    "check_model_folder",
    "check_weight_shapes",
    "check_checkpoint",
    "loading_model",
]
