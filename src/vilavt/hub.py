"""Publishing a checkpoint folder to the Hugging Face Hub (`vilavt push`)."""

import logging
from fnmatch import fnmatch
from pathlib import Path

logger = logging.getLogger(__name__)

# Never uploaded: caches, training state, editor and OS files.
EXCLUDED = (
    "__pycache__/*", "*.pyc", ".*", "*/.*",
    "optimizer.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json", "training_args.bin", "scaler.pt",
)  # fmt: skip
REQUIRED = ("config.json", "configuration_vilavt.py", "modeling_vilavt.py", "processing_vilavt.py", "prompts_vilavt.py")


def model_card_template() -> str:
    """The project's model card (shipped with the package)."""
    return (Path(__file__).parent / "remote_code" / "model_card.md").read_text(encoding="utf-8")


def files_to_upload(folder) -> list[str]:
    """The exact files `push` uploads, relative to `folder`, sorted."""
    folder = Path(folder)
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not any(fnmatch(relative, pattern) for pattern in EXCLUDED):
            files.append(relative)
    return files


def check_folder(folder) -> None:
    missing = [name for name in REQUIRED if not (Path(folder) / name).exists()]
    if not any(Path(folder).glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ValueError(f"{folder} is not a ViLaVT checkpoint folder: missing {', '.join(missing)}")


def push(folder, repo_id: str, private: bool = False, commit_message: str = "Upload ViLaVT", dry_run: bool = False, api=None):
    """Upload a checkpoint folder (adding the model card as README.md when it has none). Returns the list of
    files uploaded (or that would be, with `dry_run`)."""
    folder = Path(folder)
    check_folder(folder)
    if not (folder / "README.md").exists():
        (folder / "README.md").write_text(model_card_template(), encoding="utf-8")
    files = files_to_upload(folder)
    if dry_run:
        return files
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", allow_patterns=files, commit_message=commit_message
    )
    logger.info("uploaded %d files to %s", len(files), repo_id)
    return files


__all__ = ["push", "files_to_upload", "model_card_template"]
