"""Shared fixtures. Everything is offline: tiny models are built locally, nothing is downloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REFERENCE = Path(__file__).parent / "fixtures" / "reference-parity"


def reference_case(name: str) -> dict[str, torch.Tensor]:
    return load_file(REFERENCE / f"case_{name}.safetensors")


def query_inputs(case: dict) -> dict:
    return {k: case[k] for k in ("query_ids", "query_attention_mask", "image_to_query_mapping") if k in case}


def image_features(model, pixel_values, grid, **query) -> torch.Tensor:
    """All images' features V(I, q), concatenated (`model`: a ViLaVT model or its inner model)."""
    with torch.no_grad():
        return torch.cat(model.get_image_features(pixel_values, grid, **query).pooler_output)


# ---- conversations ----------------------------------------------------------------------------------------


def picture(size=(640, 480), color="white", seed=0) -> Image.Image:
    """A picture with a dozen coloured boxes (seeded)."""
    image = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(image)
    g = torch.Generator().manual_seed(seed)
    for _ in range(12):
        x, y = torch.randint(0, size[0] - 40, (1,), generator=g).item(), torch.randint(0, size[1] - 40, (1,), generator=g).item()
        fill = tuple(torch.randint(0, 255, (3,), generator=g).tolist())
        draw.rectangle((x, y, x + 40, y + 30), fill=fill)
    return image


def conversation(images, question="What is in the red frame?") -> list[dict]:
    """A first user turn: the images (image content items, or anything an image item takes) then the question."""
    items = [image if isinstance(image, dict) else {"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": [*items, {"type": "text", "text": question}]}]


def chat_inputs(processor, messages, **kwargs):
    """The processor's model inputs for `messages`, ready to generate."""
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


# ---- training data ----------------------------------------------------------------------------------------

TRAJECTORIES = [
    {
        "id": "two-rounds",
        "images": ["scene.png"],
        "question": "What is in the red frame?",
        "problem_type": "multiple choice",
        "answer": "B",
        "turns": [
            {"thought": "too small", "query": "the red frame", "regions": [{"index": 0, "bbox_norm": [0.55, 0.55, 0.8, 0.8]}]},
            {"thought": "closer", "query": "its centre", "regions": [{"index": 1, "bbox_2d": [0, 0, 28, 28]}]},
            {"thought": "it is B", "answer": "B"},
        ],
    },
    {
        "id": "two-images",
        "images": ["scene.png", "navy.png"],
        "question": "Is the left one brighter?",
        "problem_type": "judgment",
        "answer": "yes",
        "turns": [
            {"thought": "compare", "query": "both", "regions": [{"index": 0, "bbox_2d": [0, 0, 56, 56]}, {"index": 1, "bbox_2d": [0, 0, 40, 40]}]},
            {"thought": "yes", "answer": "yes"},
        ],
    },
]


def write_images(folder):
    """The images TRAJECTORIES name: a scene with a red frame, and a navy one."""
    scene = Image.new("RGB", (640, 480), "white")
    ImageDraw.Draw(scene).rectangle((400, 300, 460, 350), outline="red", width=4)
    scene.save(folder / "scene.png")
    Image.new("RGB", (300, 500), "navy").save(folder / "navy.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder with TRAJECTORIES as `train.jsonl` and their images."""
    folder = tmp_path_factory.mktemp("trajectories")
    write_images(folder)
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in TRAJECTORIES))
    return folder


def official_checkpoint(folder: Path) -> Path:
    """A checkpoint folder in the official layout: the fixture's config.json and weights."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in (("config.json", "config.json"), ("weights.safetensors", "model.safetensors")):
        link = folder / target
        if not link.exists():
            link.symlink_to(REFERENCE / name)
    return folder


@pytest.fixture(scope="session")
def reference_folder(tmp_path_factory) -> Path:
    return official_checkpoint(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="session")
def reference_model(reference_folder):
    from vilavt import ViLaVTForConditionalGeneration

    return ViLaVTForConditionalGeneration.from_pretrained(reference_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the default tiny ViLaVT, seed 0. Tests must not modify it."""
    from vilavt import tiny_vilavt

    return tiny_vilavt(seed=0)


def run_python(code: str, timeout: int = 300) -> str:
    """Run `code` in a fresh interpreter (nothing imported from this process carries over)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd="/"
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def replay_live(model, processor, row: dict, image_root: Path):
    """A trajectory two ways: (its training episode, the chatting loop's `generate` output when a scripted
    policy writes the trajectory's own turns)."""
    from PIL import Image
    from transformers import LogitsProcessorList

    from vilavt.scripted import ScriptedPolicy
    from vilavt.trajectories import build_episode, runs_of_model_turns

    episode = build_episode(row, processor, model.config, image_root=image_root)
    turns = [processor.tokenizer.decode(episode.ids[i:j]).removesuffix("<|im_end|>\n") for i, j in runs_of_model_turns(episode)]
    originals = [Image.open(image_root / name).convert("RGB") for name in row["images"]]
    messages = [{"role": "user", "content": [*({"type": "image", "image": im} for im in originals), {"type": "text", "text": row["question"]}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    output = model.generate(
        **inputs, images=[originals], processor=processor, return_dict_in_generate=True,
        logits_processor=LogitsProcessorList([ScriptedPolicy(processor.tokenizer, [turns])]),
    )  # fmt: skip
    return episode, output


# ---- the vLLM backend's tests (tests/test_vllm*.py) run only in the vLLM environment -----------------


def pytest_addoption(parser):
    parser.addoption(
        "--vllm", action="store_true", help="run the vLLM backend tests (tests/test_vllm*.py; needs scripts/vllm-env)"
    )


def pytest_ignore_collect(collection_path, config):
    # Not collected at all without --vllm (they need vLLM, which the main environment does not have), so they
    # can never pass as skipped; .ci/run runs them with --vllm in the vLLM environment.
    if collection_path.name.startswith("test_vllm") and not config.getoption("--vllm"):
        return True
    return None
