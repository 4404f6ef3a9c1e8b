"""Publishing a checkpoint folder to the Hugging Face Hub (`vilavt push`).

Uploaded: every file of the folder except caches, hidden files and training state (optimizer, scheduler,
RNG, scaler, trainer state and arguments, DeepSpeed `global_step*` folders), wherever they are in the tree
(e.g. `checkpoint-500/optimizer.pt`). A folder without a README.md gets the project's model card; its
`base_model` is what the folder records it was initialised from (`base_models`), and a model trained from
scratch has none. A dry run lists the files and writes nothing.
"""

import logging
import re
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from .checkpoints import remote_code_files
from .errors import InputError
from .validation import check_checkpoint, read_json

logger = logging.getLogger(__name__)

# Never uploaded, at any depth: caches, hidden files and folders, training state.
EXCLUDED_DIRS = ("__pycache__", ".*", "global_step*")
EXCLUDED_FILES = (
    "*.pyc", ".*", "optimizer.pt", "optimizer.bin", "scheduler.pt", "rng_state*.pth", "trainer_state.json",
    "training_args.bin", "scaler.pt", "*optim_states.pt",
)  # fmt: skip
REQUIRED = ("config.json", *(path.name for path in remote_code_files()))
CARD = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_card_template() -> str:
    """The project's model card (shipped with the package), without `base_model`."""
    return (Path(__file__).parent / "remote_code" / "model_card.md").read_text(encoding="utf-8")


def excluded(relative: str) -> bool:
    path = PurePosixPath(relative)
    return any(fnmatch(part, pattern) for part in path.parts[:-1] for pattern in EXCLUDED_DIRS) or any(
        fnmatch(path.name, pattern) for pattern in EXCLUDED_FILES
    )


def files_to_upload(folder) -> list[str]:
    """The folder's files that `push` uploads, relative to `folder`, sorted (a README.md it adds is not listed)."""
    folder = Path(folder)
    relatives = (path.relative_to(folder).as_posix() for path in sorted(folder.rglob("*")) if path.is_file())
    return [relative for relative in relatives if not excluded(relative)]


def base_models(folder) -> list[str]:
    """The hub ids the folder records it was initialised from: config.json's `base_model` (a string or a list),
    or its `_name_or_path` (older transformers saved it), or a PEFT adapter's `base_model_name_or_path`; local
    paths are left out (they name nothing on the Hub). None for a model trained from scratch."""
    folder = Path(folder)
    config = read_json(folder / "config.json", dict)
    recorded = config.get("base_model") or config.get("_name_or_path")
    if not recorded and (folder / "adapter_config.json").is_file():
        recorded = read_json(folder / "adapter_config.json", dict).get("base_model_name_or_path")
    names = [recorded] if isinstance(recorded, str) else list(recorded or [])
    return [name for name in names if isinstance(name, str) and HUB_ID.match(name) and not Path(name).exists()]


def model_card(folder, base_model: list[str] | None = None) -> str:
    """The model card for `folder`: the template with `base_model` set to `base_model` or, by default, to
    `base_models(folder)` (no `base_model` when there is none)."""
    from huggingface_hub import ModelCard

    card = ModelCard(model_card_template())
    card.data.base_model = list(base_model if base_model is not None else base_models(folder)) or None
    return str(card)


def check_folder(folder) -> None:
    """A checkpoint folder `push` can upload: the remote code, config, weights and tokenizer, all readable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    missing = [name for name in REQUIRED if not (folder / name).exists()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise InputError(f"{folder} is not a ViLaVT checkpoint folder: missing {', '.join(missing)}")
    check_checkpoint(folder)


def carries_authors_wording(folder) -> bool:
    """Whether the folder's prompt templates were imported from the authors' code (their `name`: `authors-*`)."""
    path = Path(folder) / "prompt_templates.json"
    if not path.is_file():
        return False
    templates = read_json(path)
    return isinstance(templates, dict) and str(templates.get("name", "")).startswith("authors-")


def push(folder, repo_id: str, private: bool = False, commit_message: str = "Upload ViLaVT", dry_run: bool = False,
         api=None, base_model: list[str] | None = None) -> list[str]:  # fmt: skip
    """Upload a checkpoint folder, adding the model card as README.md when it has none (`base_model`: the
    card's base models, default `base_models(folder)`). Returns the files uploaded, README.md included; with
    `dry_run`, the files that would be, and nothing is written."""
    folder = Path(folder)
    check_folder(folder)
    files = files_to_upload(folder)
    if carries_authors_wording(folder):
        logger.warning(
            "%s/prompt_templates.json holds the authors' prompt wording (imported by `vilavt prompts import`); their "
            "repository has no licence, so this upload would publish text that is not yours to license. Keep the "
            "repository private, or push without the file and have users import the wording themselves",
            folder,
        )
    if CARD not in files:
        files = sorted([*files, CARD])
        if not dry_run:
            (folder / CARD).write_text(model_card(folder, base_model), encoding="utf-8")
    if dry_run:
        return files
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", allow_patterns=files,
        commit_message=commit_message,
    )
    logger.info("uploaded %d files to %s", len(files), repo_id)
    return files


__all__ = ["push", "files_to_upload", "base_models", "model_card", "model_card_template", "excluded"]
