"""The shipped checkpoint behind the `vilavt` console script: demo, chat and synth-eval run end to end in
a fresh process, offline."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vilavt.demo import SHIPPED
from vilavt.synthetic import GLYPHS, make_task

VILAVT = Path(sys.executable).parent / "vilavt"  # the installed console script


def vilavt(*args: str, cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([str(VILAVT), *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    if check:
        assert result.returncode == 0, f"vilavt {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_the_checkpoint_is_shipped_small_and_without_code():
    files = {path.name for path in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors"} <= files
    assert not any(name.endswith(".py") for name in files)  # the remote code is the package's, never a copy
    assert sum(path.stat().st_size for path in SHIPPED.rglob("*") if path.is_file()) <= 25 * 2**20


def test_demo_solves_a_task_and_draws_the_trace(tmp_path):
    out = vilavt("demo", "--seed", "3", cwd=tmp_path).stdout
    assert out.startswith("task: Which way does the bar")
    assert "round 1: thought:" in out and "boxes: image 0 [" in out
    answer = out.split("\nanswer: ")[1].split("  (")[0].strip("'\"")
    assert answer in GLYPHS
    picture = Path(out.rstrip().rsplit("the trace picture is at ", 1)[1])
    assert picture == tmp_path / "vilavt-demo-trace.png"
    with Image.open(picture) as image:
        assert image.width > 200 and image.height > 200


def test_chat_on_image_files_prints_rounds_and_writes_the_picture(tmp_path):
    from vilavt.demo import load

    _, processor = load()
    row, images = make_task(10_000_123, "multi", processor)
    paths = []
    for k, image in enumerate(images):
        paths += ["--image", str(tmp_path / f"{k}.png")]
        image.save(tmp_path / f"{k}.png")
    out = vilavt("chat", *paths, "--question", row["question"], "--out", str(tmp_path / "trace.png")).stdout
    assert "round 1: thought:" in out
    answer = out.split("\nanswer: ")[1].split("  (")[0].strip("'\"")
    assert answer in ("yes", "no")
    assert (tmp_path / "trace.png").stat().st_size > 0


def test_chat_names_a_missing_image(tmp_path):
    result = vilavt("chat", "--image", str(tmp_path / "nope.png"), "--question", "What?", check=False)
    assert result.returncode == 2
    assert "nope.png" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags", [[], ["--no-tools", "--no-progress"]])
def test_synth_eval_ends_with_a_json_summary(flags):
    result = vilavt("synth-eval", "--n", "8", "--type", "single", *flags)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    if "--no-progress" in flags:
        assert "answer/s" not in result.stderr and "s/answer" not in result.stderr
    else:  # a long run shows its progress (tqdm, on stderr), to the last answer
        assert re.search(r"\| 8/8 \[[^\]]*(answer/s|s/answer)\]", result.stderr), result.stderr  # rate or time
    assert summary["n"] == 8 and summary["accuracy"] == summary["by_type"]["single"]
    assert summary["accuracy"] * 8 == round(summary["accuracy"] * 8)  # a share of 8 answers
    if flags:
        assert summary["mean_rounds"] == 0.0
    else:
        assert summary["mean_rounds"] >= 1.0  # the bar is unreadable at the first look: the model zooms
        assert summary["accuracy"] >= 0.5  # and reads it (the shipped model is right on ~90 % of single tasks)


class _SplitTokenizer:
    """Writes tags as several tokens, like the real Qwen tokenizer ("</", "think", ">"; "<", "answer", ">")."""

    def encode(self, text, add_special_tokens=False):
        return {"</think>": [1, 2, 3], "<answer>": [4, 5, 3]}[text]


@pytest.mark.parametrize("split", [False, True])
def test_a_single_look_answers_right_after_its_thought(split):
    import torch

    from vilavt.demo import AnswerAfterThought
    from vilavt.tiny import build_tokenizers

    tokenizer = _SplitTokenizer() if split else build_tokenizers()[0]
    close, answer = tokenizer.encode("</think>"), tokenizer.encode("<answer>")
    force = AnswerAfterThought(tokenizer)
    rows = [[6, 6, *close], [6, *close, *answer[:-1]] if split else [6, 6, 6], [6, *close, 6]]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    scores = torch.randn(3, 1100)
    original = scores.clone()
    out = force(input_ids, scores)
    assert out[0].argmax() == answer[0] and torch.isinf(out[0]).sum() == 1099  # nothing else is possible
    if split:
        assert out[1].argmax() == answer[-1] and torch.isinf(out[1]).sum() == 1099  # finishes the tag
    else:
        assert torch.equal(out[1], original[1])
    assert torch.equal(out[2], original[2])  # mid-thought: untouched
