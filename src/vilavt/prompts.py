"""The authors' prompt wording, imported from a user's own checkout of their repository.

The released ViLaVT was trained on the authors' exact prompt bytes, but their repository has no licence,
so this project ships none of their sentences: `vilavt prompts import REPO DIR` (or `vilavt convert ...
--prompts-from REPO`) reads the constants from REPO's `verl/utils/dataset_multimodal.py` (the RL dataset:
the first user turn) and `verl/utils/vilavt_utils.py` (the RL rollout: tool responses) into a checkpoint's
`prompt_templates.json`. The files are parsed with `ast`; nothing from REPO is imported or executed, so
only top-level assignments of string literals can be read.
"""

import ast
import logging
from pathlib import Path

from .remote_code.prompts_vilavt import (
    PROMPTS_FILE,
    SLOTS,
    PromptTemplateError,
    PromptTemplates,
    check_placeholders,
)

logger = logging.getLogger(__name__)

DATASET = "verl/utils/dataset_multimodal.py"
ROLLOUT = "verl/utils/vilavt_utils.py"

# slot -> (file, constant): what the released model was trained on (RL dataset, then RL rollout).
AUTHORS_CONSTANTS = {
    "system": (DATASET, "SYSTEM_PROMPT"),
    "image_index": (DATASET, "IMAGE_INDEX_PROMPT"),
    "single_image": (DATASET, "IMAGE_QUESTION_PROMPT"),
    "multi_image": (DATASET, "VIDEO_QUESTION_PROMPT"),
    "user": (DATASET, "USER_PROMPT"),
    "crop_index": (ROLLOUT, "IMAGE_INDEX_PROMPT_V2"),
    "response": (ROLLOUT, "RESPONSE_PROMPT"),
    "response_final": (ROLLOUT, "RESPONSE_PROMPT_FINAL"),
}
# Copies of the same text in the other file (equal in the authors' code); a copy that differs is reported.
COPIES = {
    (ROLLOUT, "REASONING_SYSTEM_PROMPT"): "system",
    (ROLLOUT, "IMAGE_INDEX_PROMPT"): "image_index",
    (ROLLOUT, "IMAGE_QUESTION_PROMPT"): "single_image",
    (ROLLOUT, "VIDEO_QUESTION_PROMPT"): "multi_image",
    (ROLLOUT, "USER_PROMPT"): "user",
    (DATASET, "IMAGE_INDEX_PROMPT_V2"): "crop_index",
}
# The evaluators' error turn is built in code, not from a constant: "[Error] " + the tool's own
# "Zoom-in failed: " + the reason; the vLLM evaluator adds its own "Zoom-in failed: " in front as well.
VARIANTS = {
    "rl": dict(error="[Error] Zoom-in failed: {message}\n", size_from="first"),
    "vllm-eval": dict(error="[Error] Zoom-in failed: Zoom-in failed: {message}\n", size_from="last"),
}


class PromptImportError(ValueError):
    """REPO cannot give the wording the renderer needs; the message names the file and the constant."""


def _string(node: ast.expr, where: str) -> str:
    """The value of a string literal (implicit or `+` concatenation of literals), read without running code."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _string(node.left, where) + _string(node.right, where)
    kind = "an f-string" if isinstance(node, ast.JoinedStr) else f"a {type(node).__name__} expression"
    raise PromptImportError(f"{where} is {kind}, not a string literal (nothing from REPO is executed)")


def top_level_assignments(path: Path, label: str) -> dict[str, ast.expr]:
    """name -> value expression of every top-level `NAME = ...` of a Python file (parsed, not run); the last
    assignment wins, as at import."""
    try:
        tree = ast.parse(path.read_bytes().decode("utf-8"), filename=str(path))
    except UnicodeDecodeError as err:
        raise PromptImportError(f"{label}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except SyntaxError as err:
        raise PromptImportError(f"{label}: not valid Python (line {err.lineno}: {err.msg})") from None
    constants = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign):
            targets, value = statement.targets, statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            targets, value = [statement.target], statement.value
        else:
            continue
        constants.update((target.id, value) for target in targets if isinstance(target, ast.Name))
    return constants


def import_authors_prompts(repo, variant: str = "rl", on_error: str = "final") -> PromptTemplates:
    """The authors' wording from a checkout `repo` of their repository.

    `variant`: "rl" (default) renders what the released model was trained on (first turn of the RL dataset,
    tool responses of the RL rollout; a failed call as their evaluators answer it); "vllm-eval" renders the
    vLLM evaluator's differences (the size line states the last image's size; its error text repeats the
    "Zoom-in failed: " prefix). `on_error`: "final" (default: the error, then the final text, as their
    evaluators), "end" (the episode ends, as their RL rollout) or "budget" (this project's behaviour).
    """
    if variant not in VARIANTS:
        raise PromptImportError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    repo = Path(repo)
    if not repo.is_dir():
        raise PromptImportError(f"{repo}: not a directory (give a checkout of the authors' ViLaVT repository)")
    files = {}
    for name in (DATASET, ROLLOUT):
        if not (repo / name).is_file():
            raise PromptImportError(f"{repo}: missing {name} (is it a checkout of the authors' ViLaVT repository?)")
        files[name] = top_level_assignments(repo / name, name)
    values = {}
    for slot, (name, constant) in AUTHORS_CONSTANTS.items():
        if constant not in files[name]:
            raise PromptImportError(f"{name}: no top-level string constant {constant}")
        where = f"{constant} ({name})"
        values[slot] = _string(files[name][constant], where)
        if SLOTS[slot]:
            try:
                check_placeholders(values[slot], SLOTS[slot], where)
            except PromptTemplateError as err:
                raise PromptImportError(str(err)) from None
    for (name, constant), slot in COPIES.items():
        node = files[name].get(constant)
        if node is not None and _string(node, f"{constant} ({name})") != values[slot]:
            source, original = AUTHORS_CONSTANTS[slot]
            logger.warning("%s in %s differs from %s in %s; using the latter", constant, name, original, source)
    try:
        prompts = PromptTemplates(**values, **VARIANTS[variant], note="", on_error=on_error, name=f"authors-{variant}")
    except PromptTemplateError as err:
        raise PromptImportError(str(err)) from None
    return prompts


def write_prompts(prompts: PromptTemplates, folder) -> Path:
    """Put `prompts` into a checkpoint folder (its processor renders them from then on)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PromptImportError(f"{folder}: not a directory (give a checkpoint folder)")
    if not any((folder / name).is_file() for name in ("config.json", "processor_config.json")):
        raise PromptImportError(
            f"{folder}: not a checkpoint or processor folder (no config.json or processor_config.json)"
        )
    return Path(prompts.save(folder / PROMPTS_FILE))


def authors_wording_notice(dst) -> str:
    """What `vilavt convert` says when it writes a released checkpoint without the authors' wording."""
    return (
        f"Note: the released ViLaVT was trained with the authors' prompt wording, which this project cannot ship "
        f"(their repository has no licence); {dst} renders the project's own wording, which the model never saw. "
        f"Import theirs from your own checkout of https://github.com/AntResearchNLP/ViLaVT with "
        f"`vilavt prompts import path/to/ViLaVT {dst}` (or convert with `--prompts-from path/to/ViLaVT`); "
        "the files are parsed, never imported or run."
    )


__all__ = [
    "import_authors_prompts",
    "write_prompts",
    "top_level_assignments",
    "authors_wording_notice",
    "PromptImportError",
    "AUTHORS_CONSTANTS",
    "VARIANTS",
]
