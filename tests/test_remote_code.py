"""A saved model + processor folder loads with trust_remote_code in a fresh process, offline."""

import json

import pytest
import torch
from conftest import run_python
from PIL import Image
from safetensors import safe_open


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    model, processor = tiny
    folder = tmp_path_factory.mktemp("remote")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = Image.new("RGB", (180, 120), (30, 140, 200))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Color?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save({"inputs": {k: v for k, v in inputs.items() if torch.is_tensor(v)}, "logits": logits}, folder / "expected.pt")
    return folder


def test_folder_carries_the_remote_code(saved):
    files = {p.name for p in saved.iterdir()}
    assert {"configuration_vilavt.py", "modeling_vilavt.py", "processing_vilavt.py"} <= files
    assert {"chat_template.jinja", "query_tokenizer", "tokenizer.json", "model.safetensors"} <= files
    auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_vilavt.ViLaVTForConditionalGeneration"
    assert auto_map["AutoModel"] == "modeling_vilavt.ViLaVTForConditionalGeneration"
    assert auto_map["AutoProcessor"] == "processing_vilavt.ViLaVTProcessor"
    with safe_open(saved / "model.safetensors", "pt") as f:
        prefixes = {key.split(".")[0] for key in f.keys()}
    assert prefixes == {"visual", "model", "lm_head", "text_encoder", "text_proj"}  # official layout


def test_fresh_process_loads_with_trust_remote_code(saved):
    out = run_python(
        f"""
import sys, torch
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
folder = {str(saved)!r}
expected = torch.load(folder + "/expected.pt")
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(processor).__name__ == "ViLaVTProcessor", type(processor)
assert processor.query_tokenizer("ab")["input_ids"][-1] == processor.query_tokenizer.convert_tokens_to_ids("<|endoftext|>")
for auto in (AutoModelForImageTextToText, AutoModel):
    model = auto.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(**expected["inputs"]).logits
    print(auto.__name__, type(model).__name__, (logits - expected["logits"]).abs().max().item())
print("vilavt imported:", "vilavt" in sys.modules)
"""
    )
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    for auto in ("AutoModelForImageTextToText", "AutoModel"):
        name, diff = lines[auto].split()
        assert name == "ViLaVTForConditionalGeneration"
        assert float(diff) == 0.0
    assert lines["vilavt"] == "imported: False"
