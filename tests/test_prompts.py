"""Prompts are checkpoint data: the authors' wording, imported from a stand-in of their repository, renders
byte for byte what their assembly code built (golden renders); the project's own wording renders its pinned
bytes (the shipped checkpoint was trained on them); templates survive save -> fresh-process load; bad REPOs get
one-line errors."""

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import official_checkpoint, run_python
from PIL import Image

from vilavt.cli import main as vilavt_main
from vilavt.demo import SHIPPED
from vilavt.prompts import PromptImportError, import_authors_prompts, write_prompts
from vilavt.remote_code.generation_vilavt import tool_response
from vilavt.remote_code.processing_vilavt import CHAT_TEMPLATE, ViLaVTProcessor
from vilavt.remote_code.prompts_vilavt import (
    COMPACT,
    FULL,
    PROMPTS_FILE,
    PromptTemplateError,
    PromptTemplates,
    tool_message,
)
from vilavt.remote_code.regions_vilavt import RegionError
from vilavt.tiny import build_tokenizers, tiny_processor

FIXTURES = Path(__file__).parent / "fixtures"
AUTHORS = FIXTURES / "authors-behaviour" / "prompts"
STANDIN = AUTHORS / "standin"
GOLDEN = {case["case"]: case for case in json.loads((AUTHORS / "golden.json").read_text(encoding="utf-8"))}
PINNED = json.loads((FIXTURES / "project-prompts" / "pinned_renders.json").read_text(encoding="utf-8"))

RL_FIRST = sorted(name for name in GOLDEN if name.startswith("rl_first_"))
TOOL = sorted(name for name in GOLDEN if name.startswith("tool_"))


TOKENIZE = dict(tokenize=True, return_dict=True, return_tensors="pt")


def image(size, color=(120, 120, 120)):
    return Image.new("RGB", tuple(size), color)


def user_turn(images: list, question: str, as_video: bool = False) -> dict:
    items = [{"type": "video", "video": images}] if as_video else [{"type": "image", "image": im} for im in images]
    return {"role": "user", "content": [*items, {"type": "text", "text": question}]}


def pinned_conversation(sequence: dict) -> list[dict]:
    messages = [user_turn([image(s) for s in sequence["sizes"]], sequence["question"])]
    for turn in sequence["turns"]:
        if "assistant" in turn:
            messages.append({"role": "assistant", "content": turn["assistant"]})
        else:
            t = turn["tool"]
            crops = [image(s) for s in t["crops"]]
            messages.append(tool_message(crops, t["first_index"], t["final"], t["error"], t["notes"]))
    return messages


@pytest.fixture(scope="module")
def authors():
    return import_authors_prompts(STANDIN)


@pytest.fixture(scope="module")
def processor_for(tmp_path_factory):
    """A tiny processor carrying imported templates, loaded from a checkpoint folder they were imported into;
    crops keep the golden sizes."""
    cache = {}

    def make(variant="rl"):
        if variant not in cache:
            folder = tmp_path_factory.mktemp(f"prompts-{variant}")
            tiny_processor(crop_max_pixels=10**8, min_pixels=28 * 28).save_pretrained(folder)
            write_prompts(import_authors_prompts(STANDIN, variant=variant), folder)
            cache[variant] = ViLaVTProcessor.from_pretrained(folder)
        return cache[variant]

    return make


def golden_sizes(case):
    inputs = case["inputs"]
    return inputs.get("displayed_sizes") or inputs["authors_displayed_sizes"]


def question_of(case, prompts):
    """The case's question: given, or recovered from its golden first user turn with the templates' wrapper
    (`{question}` sits between the formatted instruction and the rest of the template)."""
    if "question" in case["inputs"]:
        return case["inputs"]["question"]
    if not any(m["role"] == "user" for m in case["messages"]):
        return ""
    text = [m for m in case["messages"] if m["role"] == "user"][0]["content"][-1]["text"]
    before, after = prompts.user.split("{question}")
    before, after = before.split("{image_instruction}")[1].format(), after.format()
    start = text.index(before) + len(before)
    assert text.endswith(after)
    return text[start : len(text) - len(after)]


def first_turn(case, prompts, as_video=False):
    originals = [image(size) for size in golden_sizes(case)]
    return [user_turn(originals, question_of(case, prompts), as_video)], originals


def budget(case):
    """An originals' budget that keeps the golden displayed sizes (our originals share it: max_pixels / N)."""
    sizes = golden_sizes(case)
    return len(sizes) * max(w * h for w, h in sizes)


def tool_rounds(case):
    inputs = case["inputs"]
    if "rounds" in inputs:
        return inputs["rounds"]
    if "crops" in inputs:
        return [{"crops": inputs["crops"], "final": inputs["final"]}]
    return [{"crops": [], "final": inputs.get("final", False), "error": inputs["error_message"]}]


def whole_conversation(case, prompts):
    """The golden conversation in this project's message shapes (assistant turns as given; tool responses as
    `tool_message`s), with the crop images it shows."""
    messages, originals = first_turn(case, prompts)
    assistants = [m["content"][0]["text"] for m in case["messages"] if m["role"] == "assistant"]
    crops = []
    for k, turn in enumerate(assistants):
        messages.append({"role": "assistant", "content": turn})
        if k < len(tool_rounds(case)):
            r = tool_rounds(case)[k]
            shown = [image(c["size"], (10, 200, 10)) for c in r["crops"]]
            first = r["crops"][0]["index"] if r["crops"] else len(originals) + len(crops)
            messages.append(tool_message(shown, first, r["final"], r.get("error")))
            crops += shown
    return messages, originals + crops


def ids_of_text(processor, text, images):
    """Token ids of a rendered text (one `<|image_pad|>` per image), images expanded by the processor."""
    return processor(text=[text], images=images or None, return_tensors="pt")["input_ids"][0].tolist()


# ---- the authors' wording, imported from the stand-in ----------------------------------------------------


def test_import_reads_every_constant_of_the_standin(authors):
    source = (STANDIN / "verl/utils/vilavt_utils.py").read_text(encoding="utf-8")
    assert authors.response in source and authors.response_final in source and authors.crop_index in source
    assert authors.user.startswith("{image_instruction}\n# Request: {question}\n") and "{{" in authors.user
    assert (authors.on_error, authors.size_from, authors.note, authors.name) == ("final", "first", "", "authors-rl")


@pytest.mark.parametrize("name", RL_FIRST)
def test_first_turns_match_the_authors_rl_dataset(processor_for, name):
    case, processor = GOLDEN[name], processor_for()
    messages, originals = first_turn(case, processor.prompts)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, max_pixels=budget(case))
    assert text == case["rendered"]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, max_pixels=budget(case), **TOKENIZE)
    shown = processor.fit_originals(originals, budget(case))
    assert [list(im.size) for im in shown] == golden_sizes(case)
    assert out["input_ids"][0].tolist() == ids_of_text(processor, case["rendered"], shown)


def test_video_frames_follow_the_multi_image_rule(processor_for):
    """A video given as frames: each frame an image with its own index, the multi-image instruction."""
    case, processor = GOLDEN["rl_first_8frames"], processor_for()
    messages, originals = first_turn(case, processor.prompts, as_video=True)
    assert processor.apply_chat_template(messages, add_generation_prompt=True, max_pixels=budget(case)) == case["rendered"]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, max_pixels=budget(case), **TOKENIZE)
    assert len(out["image_grid_thw"]) == 8 and out["image_to_query_mapping"].tolist() == list(range(8))
    assert out["input_ids"][0].tolist() == ids_of_text(processor, case["rendered"], processor.fit_originals(originals, budget(case)))


def test_a_video_without_frames_is_a_clear_error():
    processor = tiny_processor()
    messages = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "q"}]}]
    with pytest.raises(ValueError, match="a video item must give its frames"):
        processor.apply_chat_template(messages)


@pytest.mark.parametrize("name", [*TOOL, "rl_sequence_for_reward"])
def test_whole_conversations_match(processor_for, name):
    case = GOLDEN[name]
    processor = processor_for("vllm-eval" if "vllm" in name else "rl")
    messages, images = whole_conversation(case, processor.prompts)
    kwargs = dict(add_generation_prompt=case["add_generation_prompt"], max_pixels=budget(case))
    assert processor.apply_chat_template(messages, **kwargs) == case["rendered"]
    out = processor.apply_chat_template(messages, **kwargs, **TOKENIZE)
    shown = processor.fit_originals(images[: len(golden_sizes(case))], budget(case)) + images[len(golden_sizes(case)) :]
    assert out["input_ids"][0].tolist() == ids_of_text(processor, case["rendered"], shown)


class StubLedger:
    """Stands in for the crop geometry (tested in test_regions): the crops have the golden sizes, or the call
    fails with the golden message."""

    def __init__(self, count, crops=(), error=None):
        self.count, self.crops, self.error = count, list(crops), error

    def __len__(self):
        return self.count

    def crop(self, region, *args):
        if self.error:
            raise RegionError(self.error)
        return SimpleNamespace(image=self.crops.pop(0), entry=SimpleNamespace(source=region.index), pixel_box=(0, 0, 1, 1))


@pytest.mark.parametrize("name", TOOL)
def test_the_loops_tool_responses_match(processor_for, name):
    """The tool response the chatting loop appends (`generation_vilavt.tool_response`) is the golden last user
    turn, text and token ids: crop lines with global index and final size, continue vs final text, the error
    turn (error then final text, as the authors' evaluators)."""
    case = GOLDEN[name]
    processor = processor_for("vllm-eval" if "vllm" in name else "rl")
    r = tool_rounds(case)[-1]
    crops = [image(c["size"], (10, 200, 10)) for c in r["crops"]]
    first = r["crops"][0]["index"] if r["crops"] else len(golden_sizes(case))
    episode = SimpleNamespace(ledger=StubLedger(first, crops, r.get("error")))
    turn = [m for m in case["messages"] if m["role"] == "assistant"][-1]["content"][0]["text"]
    # A failed call gets the final text from the templates (on_error="final"), whatever the budget says.
    response = tool_response(episode, processor, turn, final=r["final"] and not r.get("error"))
    assert response.ids == ids_of_text(processor, "<|im_end|>\n" + case["last_user_turn"], crops)
    assert response.error == r.get("error") and len(response.crops) == len(crops)
    assert response.grids.tolist() == [[1, crop.height // 14, crop.width // 14] for crop in crops]  # encoded at their size


def test_an_empty_region_list_renders_a_tool_response_without_crops(processor_for):
    """A call that succeeds with no crops (the authors' `zoomin` accepts an empty region list): the response text
    right after `<tool_response>` (the vLLM evaluator's no-room turn has the same bytes in its final round)."""
    case, processor = GOLDEN["vllm_eval_max_images_final"], processor_for()
    messages, _ = whole_conversation(case, processor.prompts)
    assert processor.apply_chat_template(messages, add_generation_prompt=True, max_pixels=budget(case)) == case["rendered"]
    assert processor.apply_chat_template([tool_message(final=True)], add_generation_prompt=True) == case["last_user_turn"]


@pytest.mark.parametrize("name", ["vllm_eval_first_1img", "vllm_eval_first_2img", "hf_eval_first_1img"])
def test_evaluator_first_turns_as_a_named_variant(processor_for, name):
    """The vLLM evaluator states the last image's size (variant "vllm-eval"); the HF evaluator's single-image
    turn is the RL one. (The HF evaluator's multi-image layout is not reproduced: README table.)"""
    case = GOLDEN[name]
    processor = processor_for("vllm-eval" if name.startswith("vllm") else "rl")
    messages, _ = first_turn(case, processor.prompts)
    kwargs = dict(add_generation_prompt=True, max_pixels=case["inputs"]["max_pixels"])
    assert processor.apply_chat_template(messages, **kwargs) == case["rendered"]


def test_on_error_is_part_of_the_templates(authors):
    message = tool_message(error="boom", final=False)
    crop = tool_message([image((56, 56))], 1, final=False)
    for on_error, final_after_error in (("final", True), ("end", True), ("budget", False)):
        prompts = import_authors_prompts(STANDIN, on_error=on_error)
        ends = prompts.tool_response_content(message, 1)[-1]["text"]
        assert ends == (prompts.response_final if final_after_error else prompts.response) + "</tool_response>"
        assert prompts.tool_response_content(crop, 1)[-1]["text"] == prompts.response + "</tool_response>"
    assert COMPACT.on_error == FULL.on_error == "budget"


def run_scripted(processor, turns, max_rounds=3):
    """The chatting loop with a scripted policy writing `turns`."""
    from transformers import LogitsProcessorList

    from vilavt import tiny_vilavt
    from vilavt.scripted import ScriptedPolicy

    model, _ = tiny_vilavt(seed=0)
    inputs = processor.apply_chat_template([user_turn([image((112, 112))], "q?")], add_generation_prompt=True, **TOKENIZE)
    out = model.generate(
        **inputs, images=[[image((112, 112))]], processor=processor, max_rounds=max_rounds, max_new_tokens=400,
        return_dict_in_generate=True, logits_processor=LogitsProcessorList([ScriptedPolicy(processor.tokenizer, [turns])]),
    )  # fmt: skip
    return processor.tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1] :]), out.traces[0]


BAD_CALL = '<think>t</think><tool>{"region": [{"index": 0, "bbox_2d": [0, 0, 900, 20]}], "query": "q"}</tool>'
ANSWER = "<think>t</think><answer>A</answer>"


@pytest.mark.parametrize("on_error", ["end", "final", "budget"])
def test_the_loop_follows_on_error(on_error):
    processor = tiny_processor(prompt_templates=dataclasses.replace(FULL, on_error=on_error))
    text, trace = run_scripted(processor, [BAD_CALL, ANSWER])
    assert trace.rounds[0].error is not None
    if on_error == "end":  # the authors' RL rollout: no tool response, the episode ends
        assert trace.stop_reason == "tool_error" and trace.answer is None
        assert "<tool_response>" not in text and text.endswith("</tool><|im_end|>")
    else:
        assert trace.stop_reason == "answer" and trace.answer == "A"
        expected = processor.prompts.response_final if on_error == "final" else processor.prompts.response
        assert "<tool_response>[tool error] " + trace.rounds[0].error + "\n" in text
        assert expected + "</tool_response>" in text


# ---- the project's own wording: pinned (tests/fixtures/project-prompts/make_pinned_renders.py) ------------


def test_the_shipped_demo_renders_its_pinned_text_and_token_ids():
    """The compact wording of the shipped checkpoint (its `prompt_templates.json`), through the processor and
    through the loop's tool responses, gives the pinned text and token ids: the bytes it was trained on."""
    processor = ViLaVTProcessor.from_pretrained(SHIPPED)
    assert processor.prompts == COMPACT
    pinned = PINNED["compact_shipped"]
    for case in pinned["first_turns"]:
        messages = [user_turn([image(s) for s in case["sizes"]], case["question"])]
        assert processor.apply_chat_template(messages, add_generation_prompt=True) == case["text"]
        out = processor.apply_chat_template(messages, add_generation_prompt=True, **TOKENIZE)
        assert out["input_ids"][0].tolist() == case["ids"]
    for case in pinned["tool_turns"]:
        crops = [image(s) for s in case["crops"]]
        query = " ".join(["frame"] * 80) if case["notes"] else "the bar"  # over 50 tokens: the loop's note
        regions = ", ".join('{"index": 0, "bbox_2d": [0, 0, 28, 28]}' for _ in crops or [None])
        turn = f'<think>t</think><tool>{{"region": [{regions}], "query": "{query}"}}</tool>'
        episode = SimpleNamespace(ledger=StubLedger(case["first_index"], crops, case["error"]))
        response = tool_response(episode, processor, turn, final=case["final"], turn_closed=case["closed"])
        assert response.ids == case["ids"], case["name"]
        assert response.notes == case["notes"]
    messages = pinned_conversation(pinned["sequence"])
    assert processor.apply_chat_template(messages) == pinned["sequence"]["text"]
    assert processor.apply_chat_template(messages, **TOKENIZE)["input_ids"][0].tolist() == pinned["sequence"]["ids"]


def test_an_explicit_prompt_style_replaces_the_checkpoints_templates(tmp_path):
    """`from_pretrained(..., prompt_style=...)` renders that style's wording even where the checkpoint carries a
    templates file (a keyword overrides what a checkpoint saved), and a save keeps it; without it the file wins."""
    assert ViLaVTProcessor.from_pretrained(SHIPPED).prompts == COMPACT
    processor = ViLaVTProcessor.from_pretrained(SHIPPED, prompt_style="full")
    assert processor.prompts == FULL and processor.prompt_style == "full"
    processor.save_pretrained(tmp_path)
    assert ViLaVTProcessor.from_pretrained(tmp_path).prompts == FULL
    both = ViLaVTProcessor.from_pretrained(SHIPPED, prompt_style="full", prompt_templates=COMPACT.to_dict())
    assert both.prompts == COMPACT  # explicit templates are the wording; the style only names a default
    with pytest.raises(ValueError, match="prompt_style must be one of"):
        ViLaVTProcessor.from_pretrained(SHIPPED, prompt_style="terse")


# The shape of a chat template saved before prompt text became data: it held the wording itself and read
# `prompt_style` (the words here are placeholders).
LEGACY_LOOKING = """{%- set system_prompt -%}
{%- if prompt_style == 'compact' -%}OLD COMPACT WORDS{%- else -%}OLD FULL WORDS{%- endif -%}
{%- endset -%}
{%- for message in messages -%}<|im_start|>{{ message['role'] }}
OLD TURN<|im_end|>
{% endfor -%}"""


def test_a_legacy_chat_template_is_replaced_by_the_assembler(tmp_path):
    """A checkpoint saved with a chat template that carries its own wording and no templates file: the
    assembler replaces the template and the default wording of its `prompt_style` renders."""
    folder = tmp_path / "old"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns("*.safetensors", PROMPTS_FILE))
    (folder / "chat_template.jinja").write_text(LEGACY_LOOKING, encoding="utf-8")
    processor = ViLaVTProcessor.from_pretrained(folder)
    assert processor.prompts == COMPACT and processor.chat_template == CHAT_TEMPLATE
    direct = ViLaVTProcessor(processor.image_processor, processor.tokenizer, processor.query_tokenizer,
                             chat_template=LEGACY_LOOKING, prompt_style="full")  # fmt: skip
    assert direct.prompts == FULL and direct.chat_template == CHAT_TEMPLATE
    # Only a template with both marks is taken for a legacy one: any other template is the caller's.
    own = "{%- set system_prompt -%}{%- endset -%}{% for m in messages %}{{ m['role'] }}{% endfor %}"
    assert ViLaVTProcessor(processor.image_processor, processor.tokenizer, processor.query_tokenizer,
                           chat_template=own).chat_template == own  # fmt: skip
    case = PINNED["compact_shipped"]["first_turns"][1]
    out = processor.apply_chat_template(
        [user_turn([image(s) for s in case["sizes"]], case["question"])], add_generation_prompt=True, **TOKENIZE
    )
    assert out["input_ids"][0].tolist() == case["ids"]


def test_full_wording_renders_its_pinned_text():
    processor = tiny_processor(crop_max_pixels=224 * 224)
    assert processor.prompts == FULL
    pinned = PINNED["full_tiny"]
    for case in pinned["first_turns"]:
        messages = [user_turn([image(s) for s in case["sizes"]], case["question"])]
        assert processor.apply_chat_template(messages, add_generation_prompt=True) == case["text"]
    for case in pinned["tool_turns"]:
        crops = [image(s) for s in case["crops"]]
        message = tool_message(crops, case["first_index"], case["final"], case["error"], case["notes"])
        closing = "\n" if case["closed"] else "<|im_end|>\n"
        assert closing + processor.apply_chat_template([message], add_generation_prompt=True) == case["text"]
    assert processor.apply_chat_template(pinned_conversation(pinned["sequence"])) == pinned["sequence"]["text"]


def test_tool_message_shapes():
    crop = image((56, 84))
    message = tool_message([crop], first_index=3, final=True, notes=["n"])
    assert message["role"] == "tool" and message["final"] is True and message["notes"] == ["n"]
    assert message["content"] == [{"type": "image", "image": crop, "index": 3, "width": 56, "height": 84}]
    texts = [item["text"] for item in COMPACT.tool_response_content(message, 3) if item["type"] == "text"]
    assert texts == ["<tool_response>", "[image 3: zoomed view, 56 x 84 pixels]\n", "Note: n\n",
                     COMPACT.response_final + "</tool_response>"]  # fmt: skip
    error = tool_message(error="bad")
    assert error["error"] == "bad" and error["content"] == []
    assert COMPACT.tool_response_content(error, 0)[1] == {"type": "text", "text": "[tool error] bad\n"}


# ---- files: save -> fresh process, templates validation ---------------------------------------------------


def test_templates_survive_save_and_a_fresh_process(processor_for, tmp_path):
    processor = processor_for()
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / PROMPTS_FILE).read_text(encoding="utf-8"))
    assert saved["user"] == processor.prompts.user and saved["on_error"] == "final"
    assert "prompt_templates" not in json.loads((tmp_path / "processor_config.json").read_text())
    assert (tmp_path / "prompts_vilavt.py").exists()  # the remote code the processor needs
    case = GOLDEN["tool_two_rounds_4img"]
    messages, _ = whole_conversation(case, processor.prompts)
    torch.save({"messages": messages, "max_pixels": budget(case)}, tmp_path / "case.pt")
    out = run_python(
        f"""
import torch
from transformers import AutoProcessor
folder = {str(tmp_path)!r}
case = torch.load(folder + "/case.pt", weights_only=False)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
text = processor.apply_chat_template(case["messages"], add_generation_prompt=True, max_pixels=case["max_pixels"])
open(folder + "/rendered.txt", "w", encoding="utf-8").write(text)
print(type(processor).__name__, processor.prompts.name, processor.prompts.on_error, type(processor).__module__)
from vilavt.remote_code.prompts_vilavt import COMPACT  # the package's class, not the folder's copy of it
other = AutoProcessor.from_pretrained(folder, trust_remote_code=True, prompt_templates=COMPACT)
print(type(other.prompts) is not type(COMPACT), other.prompts.to_dict() == COMPACT.to_dict())
"""
    )
    assert out.split()[:3] == ["ViLaVTProcessor", "authors-rl", "final"]
    assert not out.split()[3].startswith("vilavt.")  # the folder's own remote code
    assert out.split()[4:6] == ["True", "True"]  # templates cross between the two copies of the code
    assert (tmp_path / "rendered.txt").read_text(encoding="utf-8") == case["rendered"]


def test_bad_templates_name_the_slot():
    data = {k: v for k, v in COMPACT.to_dict().items()}
    with pytest.raises(PromptTemplateError, match=r"prompt template 'user' has placeholders \{question\}; the renderer needs \{image_instruction\}, \{question\}"):
        PromptTemplates.from_dict({**data, "user": "{question}"})
    with pytest.raises(PromptTemplateError, match=r"'crop_index' is not a valid format string"):
        PromptTemplates.from_dict({**data, "crop_index": "{current_image_idx} {width {height}"})
    with pytest.raises(PromptTemplateError, match=r"unknown keys \['sytem'\], missing keys \['system'\]"):
        PromptTemplates.from_dict({**{k: v for k, v in data.items() if k != "system"}, "sytem": "x"})
    with pytest.raises(PromptTemplateError, match="on_error must be one of budget, final, end"):
        PromptTemplates.from_dict({**data, "on_error": "retry"})


# ---- bad REPOs: one-line errors naming the file or the constant; nothing from REPO runs --------------------


def fake_repo(tmp_path, edit=None, drop=None):
    repo = tmp_path / "repo"
    shutil.copytree(STANDIN, repo)
    if drop:
        (repo / drop).unlink()
    if edit:
        name, old, new = edit
        path = repo / name
        path.write_text(path.read_text(encoding="utf-8").replace(old, new, 1), encoding="utf-8")
    return repo


@pytest.mark.parametrize(
    "edit, drop, message",
    [
        (None, "verl/utils/vilavt_utils.py", r"missing verl/utils/vilavt_utils\.py"),
        (None, "verl/utils/dataset_multimodal.py", r"missing verl/utils/dataset_multimodal\.py"),
        (("verl/utils/vilavt_utils.py", "RESPONSE_PROMPT_FINAL=", "RESPONSE_PROMPT_LAST="), None,
         r"verl/utils/vilavt_utils\.py: no top-level string constant RESPONSE_PROMPT_FINAL"),
        (("verl/utils/dataset_multimodal.py", "# Request: {question}", "# Request: {query}"), None,
         r"USER_PROMPT \(verl/utils/dataset_multimodal\.py\) has placeholders \{image_instruction\}, \{query\}; "
         r"the renderer needs \{image_instruction\}, \{question\}"),
        (("verl/utils/dataset_multimodal.py", "has index {index}", "has index {idx}"), None,
         r"IMAGE_INDEX_PROMPT \(verl/utils/dataset_multimodal\.py\) has placeholders \{idx\}; the renderer needs \{index\}"),
        (("verl/utils/vilavt_utils.py", 'IMAGE_INDEX_PROMPT_V2="""', 'IMAGE_INDEX_PROMPT_V2=f"""'), None,
         r"IMAGE_INDEX_PROMPT_V2 \(verl/utils/vilavt_utils\.py\) is an f-string, not a string literal"),
        (("verl/utils/vilavt_utils.py", 'RESPONSE_PROMPT="""', 'RESPONSE_PROMPT=load("""'), None,
         r"verl/utils/vilavt_utils\.py: not valid Python"),
    ],
)
def test_bad_repos_are_named(tmp_path, edit, drop, message):
    repo = fake_repo(tmp_path, edit, drop)
    with pytest.raises(PromptImportError, match=message):
        import_authors_prompts(repo)


def test_nothing_from_the_repo_is_executed(tmp_path):
    marker = tmp_path / "ran"
    repo = fake_repo(tmp_path)
    for name in ("verl/utils/vilavt_utils.py", "verl/utils/dataset_multimodal.py"):
        path = repo / name
        path.write_text(f"open({str(marker)!r}, 'w').write('x')\nimport sys; sys.exit(3)\n" + path.read_text(encoding="utf-8"))
    assert import_authors_prompts(repo) == import_authors_prompts(STANDIN)
    assert not marker.exists()


# ---- the CLI ---------------------------------------------------------------------------------------------


def test_cli_prompts_import(tmp_path, capsys, authors):
    folder = tmp_path / "ckpt"
    tiny_processor().save_pretrained(folder)
    assert vilavt_main(["prompts", "import", str(STANDIN), str(folder), "--on-error", "end"]) == 0
    assert str(folder / PROMPTS_FILE) in capsys.readouterr().out
    loaded = ViLaVTProcessor.from_pretrained(folder)
    assert loaded.prompts.user == authors.user and loaded.prompts.on_error == "end"
    assert vilavt_main(["prompts", "import", str(tmp_path / "nowhere"), str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vilavt prompts: error: ") and "not a directory" in err and err.count("\n") == 1
    assert vilavt_main(["prompts", "import", str(fake_repo(tmp_path, drop="verl/utils/dataset_multimodal.py")), str(folder)]) == 2
    assert "missing verl/utils/dataset_multimodal.py" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert vilavt_main(["prompts", "import", str(STANDIN), str(tmp_path / "empty")]) == 2
    assert "not a checkpoint or processor folder" in capsys.readouterr().err
    assert not (tmp_path / "empty" / PROMPTS_FILE).exists()
    with pytest.raises(SystemExit):
        vilavt_main(["prompts", "import", str(STANDIN), str(folder), "--variant", "hf-eval"])
    err = capsys.readouterr().err
    assert err.startswith("vilavt prompts import: error: argument --variant") and err.count("\n") == 1


def test_cli_convert_imports_the_wording_or_says_how(tmp_path, capsys, authors):
    src = official_checkpoint(tmp_path / "official")
    build_tokenizers()[0].save_pretrained(src)
    assert vilavt_main(["convert", str(src), str(tmp_path / "plain")]) == 0
    notice = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trained with the authors' prompt wording" in notice and "vilavt prompts import" in notice
    assert ViLaVTProcessor.from_pretrained(tmp_path / "plain").prompts == FULL
    assert vilavt_main(["convert", str(src), str(tmp_path / "faithful"), "--prompts-from", str(STANDIN)]) == 0
    assert "trained with the authors'" not in capsys.readouterr().err
    assert ViLaVTProcessor.from_pretrained(tmp_path / "faithful").prompts == authors
    argv = ["convert", str(src), str(tmp_path / "evaluator"), "--prompts-from", str(STANDIN), "--variant", "vllm-eval",
            "--on-error", "end"]  # fmt: skip
    assert vilavt_main(argv) == 0
    prompts = ViLaVTProcessor.from_pretrained(tmp_path / "evaluator").prompts
    assert (prompts.name, prompts.on_error) == ("authors-vllm-eval", "end")
    bad = fake_repo(tmp_path, edit=("verl/utils/vilavt_utils.py", "RESPONSE_PROMPT=", "RESPONSE_TEXT="))
    assert vilavt_main(["convert", str(src), str(tmp_path / "never"), "--prompts-from", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == "vilavt convert: error: verl/utils/vilavt_utils.py: no top-level string constant RESPONSE_PROMPT\n"
    assert not (tmp_path / "never").exists()  # checked before converting
