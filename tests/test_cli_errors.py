"""Every CLI error is one line on stderr with a non-zero exit, never a traceback: corrupt checkpoints (weights,
config, tokenizer), bad arguments, benchmark and results files that cannot be used, `init` / `convert` /
`push` on folders that cannot be used. All files are built here, offline.

The cases run through `vilavt.cli.main` in one fresh interpreter (file descriptor 2 captured per case, so
log lines and progress bars count too); one case also runs through the installed console script."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save

from vilavt.demo import SHIPPED, export

VILAVT = Path(sys.executable).parent / "vilavt"

DRIVER = r"""
import json, os, sys, tempfile, traceback
from vilavt.cli import main

cases, results = json.loads(sys.argv[1]), {}
for name, argv in cases.items():
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        results[name] = {"code": code, "stderr": captured.read().decode("utf-8", "replace")}
print(json.dumps(results))
"""


def run_cases(cases: dict[str, list[str]], cwd) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "VILAVT_DEBUG": ""}
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], capture_output=True, text=True,
                            timeout=900, env=env, cwd=cwd)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- the files ------------------------------------------------------------------------------------------


def checkpoint(folder: Path, weights: bytes | None = None, config=None, drop=(), **files) -> Path:
    """A copy of the shipped checkpoint (the weights linked unless replaced), with `config` (a dict changed
    by a function, or raw text) and other files replaced or dropped."""
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    if weights is None:
        (folder / "model.safetensors").symlink_to(SHIPPED / "model.safetensors")
    else:
        (folder / "model.safetensors").write_bytes(weights)
    if callable(config):
        data = json.loads((SHIPPED / "config.json").read_text())
        config(data)
        (folder / "config.json").write_text(json.dumps(data))
    elif config is not None:
        (folder / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    for name in drop:
        (folder / name).unlink()
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    return folder


def weights_with_a_wrong_shape() -> bytes:
    weights = load_file(SHIPPED / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"][:, :-1].contiguous()
    return save(weights, metadata={"format": "pt"})


def sharded(folder: Path, index: str) -> Path:
    shutil.copytree(SHIPPED, folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(index)
    return folder


def set_in(path: str, value):
    def change(config):
        *parents, leaf = path.split(".")
        for key in parents:
            config = config[key]
        config[leaf] = value

    return change


SHIPPED_WEIGHTS = (SHIPPED / "model.safetensors").read_bytes()
BAD_CHECKPOINTS = {
    # name: (how the folder is built, what the message must name)
    "weights-cut-in-half": (lambda f: checkpoint(f, weights=SHIPPED_WEIGHTS[: len(SHIPPED_WEIGHTS) // 2]), "model.safetensors"),
    "weights-cut-in-header": (lambda f: checkpoint(f, weights=SHIPPED_WEIGHTS[:50]), "model.safetensors"),
    "weights-one-byte-short": (lambda f: checkpoint(f, weights=SHIPPED_WEIGHTS[:-1]), "model.safetensors"),
    "weights-not-safetensors": (lambda f: checkpoint(f, weights=b"<html>not found</html>" * 20), "model.safetensors"),
    "weights-empty": (lambda f: checkpoint(f, weights=b""), "model.safetensors"),
    "weights-wrong-shape": (lambda f: checkpoint(f, weights=weights_with_a_wrong_shape()), "lm_head.weight"),
    "index-names-a-missing-shard": (
        lambda f: sharded(f, json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})),
        "model-00002-of-00002.safetensors",
    ),
    "index-not-json": (lambda f: sharded(f, '{"weight_map": '), "model.safetensors.index.json"),
    "config-not-json": (lambda f: checkpoint(f, config='{"model_type": "vilavt", '), "config.json"),
    "config-a-list": (lambda f: checkpoint(f, config="[1, 2]"), "config.json"),
    "config-latin-1": (lambda f: checkpoint(f, config=b'{"model_type": "vilavt", "x": "caf\xe9"}'), "config.json"),
    "config-hidden-size-text": (lambda f: checkpoint(f, config=set_in("text_config.hidden_size", "abc")), "hidden_size"),
    "config-layers-float": (lambda f: checkpoint(f, config=set_in("text_config.num_hidden_layers", 2.5)), "num_hidden_layers"),
    "config-text-config-text": (lambda f: checkpoint(f, config=set_in("text_config", "oops")), "text_config"),
    "config-query-length-list": (lambda f: checkpoint(f, config=set_in("max_query_length", [1])), "config.json"),
    "config-fullatt-text": (lambda f: checkpoint(f, config=set_in("vision_config.fullatt_block_indexes", "a")), "fullatt_block_indexes"),
    "config-heads-zero": (lambda f: checkpoint(f, config=set_in("text_config.num_attention_heads", 0)), "config.json"),
    "no-tokenizer": (lambda f: checkpoint(f, drop=("tokenizer.json", "tokenizer_config.json")), "no tokenizer"),
    "tokenizer-not-json": (lambda f: checkpoint(f, tokenizer__json="{nope"), "tokenizer"),
    "processor-config-not-json": (lambda f: checkpoint(f, processor_config__json="{"), "processor"),
}  # fmt: skip


def benchmark(folder: Path, content, name="bench.json") -> Path:
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content))
    return path


ITEM = {"question_id": 1, "question": "Which?", "answer": "A", "problem_type": "multiple choice",
        "options": ["A. x", "B. y"], "images": ["a.png"]}  # fmt: skip


def plug_in_folder(folder: Path, **changes) -> Path:
    """An exported (remote-code) checkpoint, as `vilavt push` takes it, with files replaced."""
    export(SHIPPED, folder)
    for name, content in changes.items():
        path = folder / name.replace("__", ".")
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return folder


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case's (exit code, stderr), run in one fresh interpreter."""
    root = tmp_path_factory.mktemp("cli-errors")
    cases = {}
    for name, (build, _) in BAD_CHECKPOINTS.items():
        folder = build(root / name)
        cases[f"synth-eval:{name}"] = ["synth-eval", "--n", "1", "--model", str(folder), "--no-progress"]
    for name in ("weights-cut-in-half", "config-hidden-size-text", "no-tokenizer"):
        folder = str(root / name)
        cases[f"eval:{name}"] = ["eval", "--benchmark", str(benchmark(root, [ITEM])), "--image-root", str(root),
                                 "--model", folder, "--out", str(root / f"{name}.jsonl"), "--no-progress"]  # fmt: skip
        cases[f"chat:{name}"] = ["chat", "--image", str(root / "a.png"), "--question", "Which?", "--model", folder]
    from PIL import Image

    Image.new("RGB", (64, 48), "white").save(root / "a.png")
    (root / "not-an-image.png").write_text("hello")
    good = checkpoint(root / "good")
    cases["control:synth-eval-on-a-good-copy"] = ["synth-eval", "--n", "1", "--model", str(good), "--no-progress"]

    argument_cases = {
        "synth-eval --n 0": ["synth-eval", "--n", "0"],
        "synth-eval --n -1": ["synth-eval", "--n", "-1"],
        "synth-eval --n abc": ["synth-eval", "--n", "abc"],
        "synth-eval --batch-size 0": ["synth-eval", "--n", "2", "--batch-size", "0"],
        "synth-eval --type bogus": ["synth-eval", "--n", "2", "--type", "bogus"],
        "synth-eval --type single,bogus": ["synth-eval", "--n", "2", "--type", "single,bogus"],
        "synth-eval --type ,": ["synth-eval", "--n", "2", "--type", ","],
        "synth-eval --initial-max-pixels -5": ["synth-eval", "--n", "2", "--initial-max-pixels", "-5"],
        "synth-eval --initial-max-pixels 0": ["synth-eval", "--n", "2", "--initial-max-pixels", "0"],
        "synth-eval --unknown": ["synth-eval", "--bogus-flag"],
        "init --fullatt-block-indexes a,b": ["init", "--base", str(good), "--encoder", str(good), "--out",
                                             str(root / "init-out"), "--fullatt-block-indexes", "a,b"],
        "init --fullatt-block-indexes 1,-2": ["init", "--base", str(good), "--encoder", str(good), "--out",
                                              str(root / "init-out"), "--fullatt-block-indexes", "1,-2"],
        "init --dtype bogus": ["init", "--base", str(good), "--encoder", str(good), "--out", str(root / "init-out"),
                               "--dtype", "bogus"],
        "chat --max-rounds -1": ["chat", "--image", str(root / "a.png"), "--question", "Q", "--max-rounds", "-1"],
        "eval --batch-size 0": ["eval", "--benchmark", "b.json", "--image-root", ".", "--model", "x", "--batch-size", "0"],
        "eval --temperature -1": ["eval", "--benchmark", "b.json", "--image-root", ".", "--model", "x", "--temperature", "-1"],
        "eval without --model": ["eval", "--benchmark", "b.json", "--image-root", "."],
        "unknown command": ["evaluate"],
    }  # fmt: skip
    cases.update({f"args:{name}": argv for name, argv in argument_cases.items()})

    def run_eval_on(path, *extra):
        return ["eval", "--benchmark", str(path), "--image-root", str(root), "--model", "tiny", "--no-progress", *extra]

    cases.update({
        "eval:latin-1-benchmark": run_eval_on(benchmark(root, '[{"question": "caf\xe9?"}]'.encode("latin-1"), "latin1.json")),
        "eval:binary-benchmark": run_eval_on(benchmark(root, bytes(range(256)) * 4, "binary.json")),
        "eval:binary-benchmark-dry-run": [*run_eval_on(root / "binary.json"), "--dry-run"],
        "eval:nul-bytes-benchmark": run_eval_on(benchmark(root, b"\x00\x01\x02" * 10, "nul.json")),
        "eval:utf-16-benchmark": run_eval_on(benchmark(root, json.dumps([ITEM]).encode("utf-16"), "utf16.json")),
        "eval:jsonl-latin-1-line": run_eval_on(benchmark(root, (json.dumps(ITEM) + '\n{"question": "\xe9"}\n').encode("latin-1"), "b.jsonl")),
        "eval:answer-a-list": run_eval_on(benchmark(root, [{**ITEM, "answer": ["A"]}], "answer_list.json")),
        "eval:question-a-number": run_eval_on(benchmark(root, [{**ITEM, "question": 7}], "question_number.json")),
        "eval:benchmark-an-object": run_eval_on(benchmark(root, {"items": [ITEM]}, "object.json")),
        "eval:benchmark-missing": run_eval_on(root / "nowhere.json"),
        "eval:benchmark-a-folder": run_eval_on(root),
        "eval:results-of-another-benchmark": run_eval_on(
            benchmark(root, [ITEM], "mine.json"), "--out",
            str(benchmark(root, b'{"benchmark": "other", "id": "1", "sample": 0, "score": 1.0}\n', "other.jsonl")),
        ),
        "eval:results-a-folder": run_eval_on(root / "mine.json", "--out", str(root)),
        "chat:image-missing": ["chat", "--image", str(root / "nope.png"), "--question", "Q"],
        "chat:image-not-an-image": ["chat", "--image", str(root / "not-an-image.png"), "--question", "Q"],
    })  # fmt: skip

    no_tokenizer = checkpoint(root / "base-no-tokenizer", drop=("tokenizer.json", "tokenizer_config.json"))
    init_out = str(root / "init-out")
    cases.update({
        "init:base-missing": ["init", "--base", str(root / "nope"), "--encoder", str(good), "--out", init_out],
        "init:base-without-tokenizer": ["init", "--base", str(no_tokenizer), "--encoder", str(good), "--out", init_out],
        "init:base-config-not-json": ["init", "--base", str(root / "config-not-json"), "--encoder", str(good), "--out", init_out],
        "init:encoder-weights-cut": ["init", "--base", str(good), "--encoder", str(root / "weights-cut-in-half"), "--out", init_out],
        "convert:config-not-json": ["convert", str(root / "config-not-json"), str(root / "convert-out")],
        "convert:config-a-list": ["convert", str(root / "config-a-list"), str(root / "convert-out")],
        "convert:config-wrong-type": ["convert", str(root / "config-hidden-size-text"), str(root / "convert-out")],
        "convert:weights-cut": ["convert", str(root / "weights-cut-in-half"), str(root / "convert-out")],
        "convert:weights-wrong-shape": ["convert", str(root / "weights-wrong-shape"), str(root / "convert-out")],
        "convert:source-missing": ["convert", str(root / "nope"), str(root / "convert-out")],
    })  # fmt: skip

    not_checkpoint = root / "not-a-checkpoint"
    not_checkpoint.mkdir()
    (not_checkpoint / "config.json").write_text("{}")
    push_folders = {
        "config-only": not_checkpoint,
        "missing": root / "nope",
        "a-file": root / "a.png",
        "weights-cut": plug_in_folder(root / "push-cut", model__safetensors=SHIPPED_WEIGHTS[:1000]),
        "config-not-json": plug_in_folder(root / "push-config", config__json="{"),
        "no-tokenizer": plug_in_folder(root / "push-no-tokenizer"),
    }
    (push_folders["no-tokenizer"] / "tokenizer.json").unlink()
    (push_folders["no-tokenizer"] / "tokenizer_config.json").unlink()
    for name, folder in push_folders.items():
        cases[f"push:{name}"] = ["push", str(folder), "someone/x", "--dry-run"]
        cases[f"push-for-real:{name}"] = ["push", str(folder), "someone/x"]  # fails before any network call
    return root, cases, run_cases(cases, cwd=root)


CASE_NAMES = (
    [f"synth-eval:{name}" for name in BAD_CHECKPOINTS]
    + [f"{cmd}:{name}" for name in ("weights-cut-in-half", "config-hidden-size-text", "no-tokenizer") for cmd in ("eval", "chat")]
    + [f"args:{name}" for name in (
        "synth-eval --n 0", "synth-eval --n -1", "synth-eval --n abc", "synth-eval --batch-size 0",
        "synth-eval --type bogus", "synth-eval --type single,bogus", "synth-eval --type ,",
        "synth-eval --initial-max-pixels -5", "synth-eval --initial-max-pixels 0", "synth-eval --unknown",
        "init --fullatt-block-indexes a,b", "init --fullatt-block-indexes 1,-2", "init --dtype bogus",
        "chat --max-rounds -1", "eval --batch-size 0", "eval --temperature -1", "eval without --model",
        "unknown command",
    )]
    + [f"eval:{name}" for name in (
        "latin-1-benchmark", "binary-benchmark", "binary-benchmark-dry-run", "nul-bytes-benchmark", "utf-16-benchmark",
        "jsonl-latin-1-line", "answer-a-list", "question-a-number", "benchmark-an-object", "benchmark-missing",
        "benchmark-a-folder", "results-of-another-benchmark", "results-a-folder",
    )]
    + ["chat:image-missing", "chat:image-not-an-image"]
    + [f"init:{name}" for name in ("base-missing", "base-without-tokenizer", "base-config-not-json", "encoder-weights-cut")]
    + [f"convert:{name}" for name in (
        "config-not-json", "config-a-list", "config-wrong-type", "weights-cut", "weights-wrong-shape", "source-missing",
    )]
    + [f"{cmd}:{name}" for name in ("config-only", "missing", "a-file", "weights-cut", "config-not-json", "no-tokenizer")
       for cmd in ("push", "push-for-real")]
)  # fmt: skip

# What the one line must mention (beyond "error:"), where the case is about a file or a value.
MENTIONS = {
    **{f"synth-eval:{name}": mention for name, (_, mention) in BAD_CHECKPOINTS.items()},
    "args:synth-eval --type bogus": "bogus",
    "args:init --fullatt-block-indexes a,b": "--fullatt-block-indexes",
    "eval:latin-1-benchmark": "latin1.json",
    "eval:binary-benchmark": "binary.json",
    "eval:binary-benchmark-dry-run": "binary.json",
    "eval:jsonl-latin-1-line": "line 2",
    "eval:answer-a-list": "`answer`",
    "eval:question-a-number": "`question`",
    "eval:results-of-another-benchmark": "other.jsonl",
    "chat:image-not-an-image": "not-an-image.png",
    "convert:weights-cut": "model.safetensors",
    "convert:weights-wrong-shape": "lm_head.weight",
    "init:base-without-tokenizer": "no tokenizer",
    "push:config-only": "not a ViLaVT checkpoint",
    "push:weights-cut": "model.safetensors",
    "push:no-tokenizer": "no tokenizer",
}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_one_line_error(outcomes, name):
    from vilavt.cli import COMMANDS

    _, cases, results = outcomes
    code, stderr = results[name]["code"], results[name]["stderr"]
    lines = [line for line in stderr.splitlines() if line.strip()]
    command = cases[name][0]
    assert code == 2, f"{name}: exit {code}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"{name}: {len(lines)} stderr lines:\n{stderr}"
    assert lines[0].startswith(f"vilavt {command}: error: " if command in COMMANDS else "vilavt: error: "), lines[0]
    assert MENTIONS.get(name, "") in lines[0], lines[0]


def test_every_case_is_checked(outcomes):
    _, cases, _ = outcomes
    assert set(cases) - set(CASE_NAMES) == {"control:synth-eval-on-a-good-copy"} and set(CASE_NAMES) <= set(cases)


def test_the_checks_pass_a_good_copy_and_write_nothing_on_failure(outcomes):
    root, _, results = outcomes
    control = results["control:synth-eval-on-a-good-copy"]
    assert control["code"] == 0, control["stderr"]
    assert not (root / "init-out").exists() and not (root / "convert-out").exists()  # failed before writing
    assert not any((root / f"push-{name}" / "README.md").exists() for name in ("cut", "config", "no-tokenizer"))


def test_the_console_script_prints_one_line(tmp_path):
    folder = checkpoint(tmp_path / "cut", weights=SHIPPED_WEIGHTS[:4096])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "VILAVT_DEBUG": ""}
    result = subprocess.run([str(VILAVT), "synth-eval", "--n", "1", "--model", str(folder)], capture_output=True,
                            text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"vilavt synth-eval: error: {folder / 'model.safetensors'}: not a readable")
    debug = subprocess.run([str(VILAVT), "--debug", "synth-eval", "--n", "1", "--model", str(folder)],
                           capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "InputError" in debug.stderr


# ---- in-process: what counts as a bug ---------------------------------------------------------------


def test_a_bug_still_shows_its_traceback(monkeypatch):
    from vilavt import cli

    def buggy(argv):
        return {}["missing"]

    monkeypatch.setitem(cli.COMMANDS, "demo", buggy)
    with pytest.raises(KeyError):
        cli.main(["demo"])

    def library_value_error(argv):
        import numpy as np

        np.reshape(np.zeros(3), (2, 2))  # a ValueError raised inside a library: not the user's

    monkeypatch.setitem(cli.COMMANDS, "demo", library_value_error)
    with pytest.raises(ValueError):
        cli.main(["demo"])


def test_debug_shows_the_traceback_of_expected_errors(tmp_path, monkeypatch, capsys):
    from vilavt import cli
    from vilavt.errors import InputError

    path = benchmark(tmp_path, b"caf\xe9", "latin1.json")
    argv = ["eval", "--benchmark", str(path), "--image-root", str(tmp_path), "--dry-run"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().endswith("latin1.json: not UTF-8 text (byte 0xe9 at offset 3, line 1); save it as UTF-8")
    with pytest.raises(InputError):
        cli.main(["--debug", *argv])
    monkeypatch.setenv("VILAVT_DEBUG", "1")
    with pytest.raises(InputError):
        cli.main(argv)


def test_project_checks_raising_value_error_are_expected():
    from vilavt.benchmarks import build_question, canonical_problem_type
    from vilavt.errors import is_expected

    with pytest.raises(ValueError) as raised:
        canonical_problem_type("essay")  # a plain ValueError raised by the project's own check
    assert is_expected(raised.value)
    with pytest.raises(TypeError) as raised:
        build_question("Q?", "multiple choice", options=5)  # a TypeError inside the project's code is a bug's
    assert not is_expected(raised.value)
