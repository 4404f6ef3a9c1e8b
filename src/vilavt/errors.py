"""Which errors are the user's (bad input: shown as one line) and which are bugs (shown with a traceback).

The `vilavt` command prints an expected error as `vilavt CMD: error: MESSAGE` and exits with status 2;
anything else propagates with its traceback. `vilavt --debug CMD ...` or `VILAVT_DEBUG=1` shows the
traceback of expected errors too.

Expected errors:
* the project's own error classes (any exception class defined in a `vilavt` module or a remote-code
  `*_vilavt` module: `InputError`, `BenchmarkError`, `ImageLoadError`, ...) and the `ValueError`s that the
  project's own code raises on bad input;
* the libraries' errors about files and data: `OSError` (missing files, permissions, hub errors),
  safetensors' `SafetensorError`, JSON / YAML syntax errors, `UnicodeError`, huggingface_hub's
  strict-dataclass validation (a config field of the wrong type).
"""

import json
import sys
from contextlib import contextmanager
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


class InputError(ValueError):
    """A file, folder or value handed to the project that cannot be used; the message is one line naming it."""


def one_line(err: BaseException) -> str:
    """The error's message on one line: a file error as "FILE: reason"; a library's error after its class name."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"  # e.g. "results.jsonl: Is a directory"
    text = " ".join(str(err).split())
    if not text or not _is_project_class(type(err)):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text


def _is_project_class(cls: type) -> bool:
    module = cls.__module__ or ""
    return module == "vilavt" or module.startswith("vilavt.") or module.rsplit(".", 1)[-1].endswith("_vilavt")


def _raised_by_project_code(err: BaseException) -> bool:
    """Whether the innermost frame of the traceback is in the project's own source (a deliberate check)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = Path(tb.tb_frame.f_code.co_filename)
    return filename.name.endswith("_vilavt.py") or PACKAGE_DIR in filename.resolve().parents


def _library_error_types() -> tuple[type, ...]:
    types: list[type] = [OSError, json.JSONDecodeError, UnicodeError]
    for module, name in (
        ("safetensors", "SafetensorError"),
        ("yaml", "YAMLError"),
        ("huggingface_hub.errors", "StrictDataclassError"),
    ):
        found = getattr(sys.modules.get(module), name, None)  # only libraries already imported can have raised
        if isinstance(found, type):
            types.append(found)
    return tuple(types)


def is_expected(err: BaseException) -> bool:
    """Whether `err` is bad input (shown as one line) rather than a bug (shown with its traceback)."""
    if _is_project_class(type(err)) or isinstance(err, _library_error_types()):
        return True
    return isinstance(err, ValueError) and _raised_by_project_code(err)


@contextmanager
def errors_named(what: str):
    """Re-raise an error of the block as an `InputError` starting with `what` (e.g. the file being read); the
    project's own errors, which name what they are about, pass unchanged. For blocks whose failures come
    from a user's files (a library's error there rarely says which file)."""
    try:
        yield
    except Exception as err:
        if _is_project_class(type(err)):
            raise
        raise InputError(f"{what}: {one_line(err)}") from err


__all__ = ["InputError", "one_line", "is_expected", "errors_named"]
