"""The standard Hugging Face ways of calling the model give the chatting loop's answer: a plain
`generate(**inputs)`, the `image-text-to-text` pipeline, and the two-step `apply_chat_template(tokenize=False)`
then `processor(text, images)` flow."""

import re

import pytest
import torch
from PIL import Image
from transformers import pipeline

from conftest import chat_inputs, conversation, picture


@pytest.mark.parametrize("sizes", [[(640, 480)], [(640, 480), (300, 500)], [(1200, 90), (90, 1200), (500, 500)]])
@pytest.mark.parametrize("max_pixels", [None, 56 * 56 * 2])
def test_two_step_flow_encodes_the_sizes_its_text_states(tiny, sizes, max_pixels):
    _, processor = tiny
    images = [picture(size, seed=i) for i, size in enumerate(sizes)]
    messages = conversation(images)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, max_pixels=max_pixels)
    two = processor(text=text, images=images, return_tensors="pt")
    one = chat_inputs(processor, messages, max_pixels=max_pixels)
    assert torch.equal(two["input_ids"], one["input_ids"])
    assert torch.equal(two["image_grid_thw"], one["image_grid_thw"])
    torch.testing.assert_close(two["pixel_values"], one["pixel_values"])
    # The sizes the text states are the encoded ones (14-pixel patches).
    stated = [(item["width"], item["height"]) for item in processor.prepare_conversation(messages, max_pixels=max_pixels)[0][0]["content"][:-1]]
    assert [(w * 14, h * 14) for _, h, w in two["image_grid_thw"].tolist()] == stated


def test_two_step_flow_without_the_rendering_processor_uses_the_rule(tiny):
    """A text rendered elsewhere (another process, another processor object): the default sizing rule, which is
    what the default rendering states."""
    from vilavt import tiny_vilavt

    _, processor = tiny
    _, other = tiny_vilavt()
    images = [picture((900, 700)), picture((300, 500), seed=2)]
    text = other.apply_chat_template(conversation(images), add_generation_prompt=True)
    two = processor(text=text, images=images, return_tensors="pt")
    one = chat_inputs(processor, conversation(images))
    assert torch.equal(two["input_ids"], one["input_ids"]) and torch.equal(two["image_grid_thw"], one["image_grid_thw"])


def test_a_text_and_images_that_disagree_is_a_clear_error(tiny):
    _, processor = tiny
    text = processor.apply_chat_template(conversation([picture()]), add_generation_prompt=True)
    with pytest.raises(ValueError, match=re.escape("1 <|image_pad|> placeholders but 2 images")):
        processor(text=text, images=[picture(), picture()])


def test_processor_outputs_carry_the_originals(tiny):
    model, processor = tiny
    image = picture((1000, 800))
    inputs = chat_inputs(processor, conversation([image]))
    (originals,) = inputs["originals"]
    assert originals[0].size == (1000, 800)  # full resolution, while pixel_values are the displayed image
    assert inputs.to("cpu")["originals"] is inputs["originals"]
    with torch.no_grad():  # the forward pass takes the processor's outputs as they are
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_plain_generate_crops_from_the_originals(tiny):
    from vilavt.scripted import ScriptedPolicy, answer_text, tool_call_text
    from transformers import LogitsProcessorList

    model, processor = tiny
    image = picture((1600, 1200))
    inputs = chat_inputs(processor, conversation([image]))
    script = [[(1, tool_call_text([(0, [0, 0, 56, 56])], "corner")), (1, answer_text("x"))]]
    policy = lambda: LogitsProcessorList([ScriptedPolicy(processor.tokenizer, script)])  # noqa: E731
    plain = model.generate(**inputs, processor=processor, logits_processor=policy(), return_dict_in_generate=True)
    explicit = model.generate(**inputs, images=[[image]], processor=processor, logits_processor=policy(),
                              return_dict_in_generate=True)
    crop = plain.traces[0].rounds[0]
    assert crop.regions[0]["box_in_original"][2] > 56  # the box is in the 1600-pixel original, not the displayed image
    assert torch.equal(plain.sequences, explicit.sequences)
    assert crop.regions == explicit.traces[0].rounds[0].regions


@pytest.fixture(scope="module")
def shipped():
    from vilavt.demo import load

    return load()


def tasks(processor, count):
    from vilavt.synthetic import make_task

    kinds = ["single", "multi", "nested"]
    return [make_task(10_000_000 + 500 + i, kinds[i % 3], processor) for i in range(count)]


def answer_of(processor, sequence, prompt_length):
    from vilavt.remote_code.protocol_vilavt import extract_answer

    completion = processor.tokenizer.decode(sequence[prompt_length:], skip_special_tokens=True)
    return extract_answer(completion.split("assistant\n")[-1])


def test_shipped_model_answers_the_same_through_chat_generate_and_the_pipeline(shipped):
    """Held-out synthetic tasks: `model.chat`, a plain `generate(**inputs)` and the image-text-to-text pipeline
    (which gives `generate` only the processor's outputs) give the same answers, rounds included."""
    model, processor = shipped
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    for row, images in tasks(processor, 9):
        answer, trace = model.chat(images, row["question"], processor=processor, max_new_tokens=1024)
        messages = conversation(images, row["question"])
        inputs = chat_inputs(processor, messages)
        sequences = model.generate(**inputs, max_new_tokens=1024)
        assert answer_of(processor, sequences[0], inputs["input_ids"].shape[1]) == answer, row["question"]
        generated = pipe(text=messages, max_new_tokens=1024)[0]["generated_text"]
        text = generated[-1]["content"] if isinstance(generated, list) else generated
        assert answer_of(processor, processor.tokenizer(text)["input_ids"], 0) == answer
        assert trace.rounds and trace.stop_reason == "answer"


def test_stock_trl_grpo_refuses_at_once(tiny):
    """TRL's own GRPOTrainer cannot score rollouts holding crops: building it fails with a pointer to vilavt grpo."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, processor = tiny
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}],
                                  "image": Image.new("RGB", (64, 64))}])
    args = GRPOConfig(output_dir="/tmp/unused", report_to=[], bf16=False, num_generations=2, per_device_train_batch_size=2)
    with pytest.raises(ValueError, match="vilavt grpo"):
        GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=args,
                    train_dataset=dataset, processing_class=processor)
