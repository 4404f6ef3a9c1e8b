"""Checkpoint folders: official -> plug-in conversion (shard by shard), assembling a starting checkpoint
from Qwen2.5-VL + Qwen3, and the exact file list `vilavt push` uploads (no network)."""

import json

import pytest
import torch
from conftest import REFERENCE, reference_case, run_python
from safetensors.torch import load_file, save_file

from vilavt.checkpoints import convert_official, init_from_base
from vilavt.hub import files_to_upload, push
from vilavt.tiny import build_tokenizers


def official_folder(folder, v4_names=False, drop=None):
    """The fixture's weights as an official checkpoint: 3 shards + index, the authors' config, a tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = load_file(REFERENCE / "weights.safetensors")
    if v4_names:  # the v3/v4 files' names, plus their unused separator embedding
        weights = {k.replace("instruct_key_proj", "instruct_k_proj").replace("instruct_value_proj", "instruct_v_proj"): v for k, v in weights.items()}
        weights["visual.sep_token_embedding.weight"] = torch.zeros(1, 64)
    if drop:
        weights.pop(drop)
    names = sorted(weights)
    chunks = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, chunk in enumerate(chunks, 1):
        shard = f"model-{i:05d}-of-00003.safetensors"
        save_file({k: weights[k] for k in chunk}, folder / shard)
        weight_map.update(dict.fromkeys(chunk, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((REFERENCE / "config.json").read_text())
    config.update(architectures=["Qwen2_5_VLForConditionalGeneration_Vilavt"], model_type="vilavt")
    (folder / "config.json").write_text(json.dumps(config))
    build_tokenizers()[0].save_pretrained(folder)
    return folder


@pytest.mark.parametrize("v4_names", [False, True])
def test_convert_round_trip_reproduces_the_reference(tmp_path, v4_names):
    src = official_folder(tmp_path / "official", v4_names=v4_names)
    dst = convert_official(src, tmp_path / "plugin")
    files = {p.name for p in dst.iterdir()}
    assert {"configuration_vilavt.py", "modeling_vilavt.py", "processing_vilavt.py", "model.safetensors.index.json"} <= files
    assert "query_tokenizer" in files and "chat_template.jinja" in files
    assert json.loads((dst / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"]
    case = reference_case("d")
    torch.save({k: case[k] for k in case if not k.startswith("debug.")}, tmp_path / "case_d.pt")
    out = run_python(
        f"""
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
folder = {str(dst)!r}
model, info = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
assert not any(info.values()), info
case = torch.load({str(tmp_path / "case_d.pt")!r})
with torch.no_grad():
    logits = model.eval()(input_ids=case["input_ids"], attention_mask=case["attention_mask"], pixel_values=case["pixel_values"],
                   image_grid_thw=case["image_grid_thw"], query_ids=case["query_ids"], query_attention_mask=case["query_attention_mask"],
                   image_to_query_mapping=case["image_to_query_mapping"]).logits
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
query = processor.query_tokenizer("ab")["input_ids"]
print((logits - case["logits"]).abs().max().item(), query[-1] == processor.query_tokenizer.convert_tokens_to_ids("<|endoftext|>"),
      processor.query_tokenizer.padding_side)
"""
    )
    diff, eos, side = out.split()
    assert float(diff) < 1e-4 and eos == "True" and side == "right"


def test_convert_names_what_does_not_match(tmp_path):
    src = official_folder(tmp_path / "official", drop="text_proj.bias")
    with pytest.raises(ValueError, match=r"1 missing keys \['text_proj.bias'\], 0 unexpected"):
        convert_official(src, tmp_path / "plugin")


def test_init_from_qwen2_5_vl_and_qwen3(tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3Config, Qwen3Model

    from vilavt import ViLaVTForConditionalGeneration
    from vilavt.tiny import tiny_config

    tokenizer, query_tokenizer = build_tokenizers()
    tiny = tiny_config(tokenizer, query_tokenizer)
    vision = {k: v for k, v in tiny.vision_config.to_dict().items() if k not in ("integration_point", "model_type")}
    base = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(vision_config=vision, text_config=tiny.text_config.to_dict(), image_token_id=tiny.image_token_id,
                         video_token_id=tiny.video_token_id, vision_start_token_id=tiny.vision_start_token_id,
                         vision_end_token_id=tiny.vision_end_token_id)
    ).eval()  # fmt: skip
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    Qwen3Model(Qwen3Config(**tiny.text_encoder_config.to_dict())).save_pretrained(tmp_path / "encoder")
    query_tokenizer.save_pretrained(tmp_path / "encoder")

    out = init_from_base(tmp_path / "base", tmp_path / "encoder", tmp_path / "vilavt", fullatt_block_indexes=[1, 3])
    model, info = ViLaVTForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.vision_config.query_aware_blocks == [2, 3]
    ids = torch.arange(20, 40)[None]
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, base(input_ids=ids).logits)  # the LLM is the base's
    assert model.model.text_proj.bias.abs().max() == 0


@pytest.fixture
def checkpoint(tiny, tmp_path):
    model, processor = tiny
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "__pycache__").mkdir(exist_ok=True)
    (folder / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"")
    (folder / "optimizer.pt").write_bytes(b"")
    (folder / ".DS_Store").write_bytes(b"")
    # Training state anywhere in the tree (a Trainer's checkpoint-*/, DeepSpeed's global_step*/) is never uploaded.
    for name in TRAINING_STATE:
        for sub in ("checkpoint-500", "checkpoint-500/nested", "runs/checkpoint-9"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            (folder / sub / name).write_bytes(b"x")
    (folder / "global_step500").mkdir()
    (folder / "global_step500" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (folder / "checkpoint-500" / ".git").mkdir()
    (folder / "checkpoint-500" / ".git" / "HEAD").write_bytes(b"x")
    (folder / "checkpoint-500" / "__pycache__").mkdir()
    (folder / "checkpoint-500" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"x")
    return folder


TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_3.pth", "trainer_state.json",
                  "training_args.bin", "scaler.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")  # fmt: skip
UPLOADED = sorted(
    ["README.md", "chat_template.jinja", "config.json", "configuration_vilavt.py", "generation_config.json",
     "generation_vilavt.py", "images_vilavt.py", "model.safetensors", "modeling_vilavt.py", "processing_vilavt.py", "processor_config.json",
     "prompt_templates.json", "prompts_vilavt.py", "protocol_vilavt.py", "query_tokenizer/tokenizer.json", "query_tokenizer/tokenizer_config.json", "regions_vilavt.py", "cache_vilavt.py",
     "tokenizer.json", "tokenizer_config.json", "trace_vilavt.py"]
)  # fmt: skip


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_uploads_exactly_the_checkpoint(checkpoint):
    class FakeApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, **kwargs):
            self.calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            self.calls.append(("upload_folder", kwargs))

    api = FakeApi()
    files = push(checkpoint, "someone/vilavt-tiny", private=True, api=api)
    expected = UPLOADED
    assert files == expected
    assert api.calls[0] == ("create_repo", "someone/vilavt-tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    assert api.calls[1][1]["allow_patterns"] == expected
    assert (checkpoint / "README.md").read_text().startswith("---\nlibrary_name: transformers")
    assert files_to_upload(checkpoint) == expected


def test_push_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="missing cache_vilavt.py, configuration_vilavt.py, .*modeling_vilavt.py, processing_vilavt.py, prompts_vilavt.py"):
        push(tmp_path, "someone/x", dry_run=True)


def test_push_refuses_a_checkpoint_whose_files_cannot_be_loaded(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        push(checkpoint, "someone/x", dry_run=True)
    assert not (checkpoint / "README.md").exists()


def test_a_dry_run_writes_nothing_and_lists_the_card_it_would_add(checkpoint, capsys):
    from vilavt.cli import main

    before = snapshot(checkpoint)
    assert push(checkpoint, "someone/x", dry_run=True) == UPLOADED
    assert main(["push", str(checkpoint), "someone/x", "--dry-run"]) == 0
    assert snapshot(checkpoint) == before  # not a byte written
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "README.md  (would add: the model card)"
    assert printed[1:-1] == UPLOADED[1:] and printed[-1] == f"would upload {len(UPLOADED)} files to someone/x"
    (checkpoint / "README.md").write_text("my own card")
    assert main(["push", str(checkpoint), "someone/x", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "README.md"  # the folder's own card: uploaded as it is
    assert (checkpoint / "README.md").read_text() == "my own card"


def test_push_warns_before_publishing_the_authors_wording(checkpoint, caplog):
    import json

    templates = checkpoint / "prompt_templates.json"
    with caplog.at_level("WARNING", logger="vilavt.hub"):
        push(checkpoint, "someone/x", dry_run=True)
    assert not caplog.records  # the project's own wording
    templates.write_text(json.dumps({**json.loads(templates.read_text()), "name": "authors-rl"}))
    with caplog.at_level("WARNING", logger="vilavt.hub"):
        push(checkpoint, "someone/x", dry_run=True)
    assert "authors' prompt wording" in caplog.text and "no licence" in caplog.text


def card_metadata(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


def test_the_card_names_what_the_folder_was_initialised_from(checkpoint):
    from vilavt.hub import model_card

    card = card_metadata(model_card(checkpoint))
    assert "base_model" not in card and card["library_name"] == "transformers"  # trained from scratch: none
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    for recorded, expected in [
        (["Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen3-Embedding-0.6B"], ["Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen3-Embedding-0.6B"]),
        ("someone/vilavt-7b-sft", ["someone/vilavt-7b-sft"]),
        (str(checkpoint), None),  # a local path names nothing on the Hub
        ("/data/models/qwen", None),
    ]:  # fmt: skip
        config_path.write_text(json.dumps({**config, "base_model": recorded}))
        assert card_metadata(model_card(checkpoint)).get("base_model") == expected
    config_path.write_text(json.dumps({**config, "_name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct"}))  # older saves
    assert card_metadata(model_card(checkpoint))["base_model"] == ["Qwen/Qwen2.5-VL-3B-Instruct"]
    assert card_metadata(model_card(checkpoint, base_model=["a/b"]))["base_model"] == ["a/b"]


def test_push_writes_the_card_with_the_base_model_given(checkpoint):
    from vilavt.cli import main

    class NoNetwork:
        def create_repo(self, *args, **kwargs):
            pass

        def upload_folder(self, **kwargs):
            self.uploaded = kwargs["allow_patterns"]

    api = NoNetwork()
    files = push(checkpoint, "someone/x", api=api, base_model=["Qwen/Qwen2.5-VL-7B-Instruct"])
    assert files == api.uploaded == UPLOADED
    assert card_metadata((checkpoint / "README.md").read_text())["base_model"] == ["Qwen/Qwen2.5-VL-7B-Instruct"]
    (checkpoint / "README.md").unlink()
    assert main(["push", str(checkpoint), "someone/x", "--dry-run", "--base-model", "a/b", "--base-model", "c/d"]) == 0
    assert not (checkpoint / "README.md").exists()
