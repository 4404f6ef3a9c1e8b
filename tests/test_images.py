"""Images on every path (open_image, the chat template, processor(images=...), chat, generate, vilavt chat,
vilavt eval): extreme aspect ratios, high bit depth, URLs and data URIs, EXIF orientation. Every fixture is
made here; nothing touches the network (URLs are served from 127.0.0.1)."""

import base64
import functools
import http.server
import io
import json
import socket
import threading

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import LogitsProcessorList

from conftest import chat_inputs, conversation

from vilavt.benchmarks import read_results, run_eval
from vilavt.remote_code.images_vilavt import MAX_ASPECT_RATIO, PAD_COLOR, prepare_image
from vilavt.remote_code.processing_vilavt import ImageLoadError, open_image
from vilavt.scripted import ScriptedPolicy, answer_text, tool_call_text


def stripes(size, period=7) -> Image.Image:
    """Vertical colour stripes (any crop of them shows structure; their x position can be read back)."""
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for x in range(0, size[0], period):
        draw.rectangle((x, 0, x + period - 1, size[1]), fill=((x * 37) % 256, (x * 11) % 256, 200))
    return image


def png_bytes(image: Image.Image, fmt="PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def encoded_size(inputs, row=0) -> tuple[int, int]:
    """(width, height) in pixels of the image the processor encoded."""
    _, rows, cols = inputs["image_grid_thw"][row].tolist()
    return cols * 14, rows * 14


# ---- extreme aspect ratios ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(10_000, 10), (10, 10_000), (201, 1), (1, 4_000), (60_000, 7), (2_001, 10)])
def test_images_past_200_to_1_are_padded_and_keep_their_pixel_coordinates(tmp_path, size):
    path = tmp_path / "strip.png"
    stripes(size).save(path)
    image = open_image(path)
    width, height = size
    expected = (max(width, -(-height // MAX_ASPECT_RATIO)), max(height, -(-width // MAX_ASPECT_RATIO)))
    assert image.size == expected and max(image.size) <= MAX_ASPECT_RATIO * min(image.size)
    # The file's pixels stay where they were (top-left); the padding is the processor's mean colour.
    original = Image.open(path).convert("RGB")
    assert image.crop((0, 0, width, height)).tobytes() == original.tobytes()
    assert image.getpixel((image.width - 1, image.height - 1)) == PAD_COLOR


def test_200_to_1_is_not_padded():
    image = stripes((4_000, 20))
    assert prepare_image(image) is image


def test_padding_past_the_decompression_bomb_limit_is_an_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "line.png"
    stripes((5_000, 1)).save(path)  # 5,000 pixels, 125,000 once padded to 5,000 x 25
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(ImageLoadError, match=r"line\.png: a 5000 x 1 image is past the 200:1 aspect ratio"):
        open_image(path)


def test_extreme_images_go_through_the_chat_template_and_the_processor(tiny, tmp_path):
    _, processor = tiny
    path = tmp_path / "wide.png"
    stripes((10_000, 10)).save(path)
    inputs = chat_inputs(processor, conversation([{"type": "image", "image": str(path)}]))
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    shown = encoded_size(inputs)
    assert f"displayed at {shown[0]} x {shown[1]} pixels." in text
    # A PIL image straight to the processor: encoded, not a bare ValueError.
    direct = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[stripes((10, 9_000))])
    width, height = encoded_size(direct)
    assert height > 100 * width


def test_chat_on_an_extreme_image_crops_the_original_pixels(tiny, tmp_path):
    model, processor = tiny
    path = tmp_path / "wide.png"
    stripes((10_000, 10)).save(path)
    shown = processor.fit_originals([open_image(path)])[0]
    box = [shown.width // 2, 0, shown.width // 2 + 28, shown.height]
    policy = ScriptedPolicy(processor.tokenizer, [[tool_call_text([(0, box)], "the stripes"), answer_text("A")]])
    answer, trace = model.chat(
        str(path), "What colour?", processor=processor, logits_processor=LogitsProcessorList([policy])
    )
    assert answer == "A" and trace.rounds[0].error is None
    x1, y1, x2, y2 = trace.rounds[0].regions[0]["box_in_original"]
    assert abs(x1 - 5_000) <= 20 and y1 == 0 and y2 == 50  # the padded original: 10,000 x 50
    assert trace.rounds[0].crops[0].width >= 28


def test_vilavt_chat_on_an_extreme_image(tmp_path, capsys):
    from vilavt.cli import main

    path = tmp_path / "tall.png"
    stripes((8, 4_000)).save(path)
    assert main(["chat", "--image", str(path), "--question", "Which way?", "--max-rounds", "1"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err


# ---- an eval run over a file holding bad images -------------------------------------------------------------


def scripted_eval_model(model, monkeypatch, answer="A"):
    """`model.generate` answers every row with `answer`; returns the list of question lists per call."""
    calls, generate = [], model.generate

    def wrapped(**kwargs):
        processor = kwargs["processor"]
        prompts = processor.tokenizer.batch_decode(kwargs["input_ids"])
        calls.append([prompt.split("Task: ")[1].split("\n")[0] for prompt in prompts])
        policy = ScriptedPolicy(processor.tokenizer, [[answer_text(answer)] for _ in prompts])
        return generate(**kwargs, logits_processor=LogitsProcessorList([policy]))

    monkeypatch.setattr(model, "generate", wrapped)
    return calls


def test_an_eval_run_records_bad_images_goes_on_and_resumes(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    images = tmp_path / "images"
    images.mkdir()
    stripes((300, 200)).save(images / "fine.png")
    stripes((10_000, 10)).save(images / "wide.png")  # past 200:1: padded, answered
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    stripes((3_000, 3_000)).save(images / "bomb.png")  # past the (lowered) decompression-bomb limit
    names = ["fine", "wide", "corrupt", "bomb", "fine"]
    records = [
        dict(question_id=f"q{k}", question=f"item{k}", answer="A", options=["A. yes", "B. no"],
             problem_type="multiple choice", images=[f"{name}.png"])
        for k, name in enumerate(names)
    ]  # fmt: skip
    benchmark = tmp_path / "mini.json"
    benchmark.write_text(json.dumps(records))
    out = tmp_path / "results.jsonl"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000_000)
    calls = scripted_eval_model(model, monkeypatch)
    kwargs = dict(batch_size=2, max_rounds=1, out_path=out, progress=False, max_new_tokens=40)
    summary = run_eval(benchmark, images, model, processor, **kwargs)
    assert sorted(q for call in calls for q in call) == ["item0", "item1", "item4"]
    results = read_results(out, "mini")
    errors = {key[0]: r["error"] for key, r in results.items() if r["error"]}
    assert set(errors) == {"q2", "q3"} and summary["errors"] == 2 and summary["samples"] == 3
    assert "corrupt.png: not a readable image" in errors["q2"]
    assert "bomb.png: image is past PIL's decompression-bomb limit" in errors["q3"]
    assert results[("q1", 0)]["answer"] == "A" and results[("q1", 0)]["score"] == 1.0
    # A rerun tries only the failed items again, and finishes; fixed, they are answered.
    calls.clear()
    summary = run_eval(benchmark, images, model, processor, **kwargs)
    assert calls == [] and summary["errors"] == 2
    stripes((100, 80)).save(images / "corrupt.png")
    summary = run_eval(benchmark, images, model, processor, **kwargs)
    assert calls == [["item2"]] and summary["errors"] == 1 and summary["accuracy"] == pytest.approx(4 / 5)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 5 + 2 + 2


# ---- high bit depth -----------------------------------------------------------------------------------------


def gradient(mode: str, low: float, high: float, width=512, height=4) -> Image.Image:
    """A horizontal ramp from `low` to `high` in `mode` (I;16, I or F)."""
    values = [low + (high - low) * x / (width - 1) for x in range(width)]
    image = Image.new("F", (width, height))
    image.putdata(values * height)
    if mode == "F":
        return image
    ints = Image.new("I", (width, height))
    ints.putdata([round(v) for v in values] * height)
    return ints if mode == "I" else ints.convert("I;16")


def assert_ramp(image: Image.Image) -> None:
    """An upright 8-bit RGB ramp over the whole 0..255 range (not clipped to white)."""
    assert image.mode == "RGB"
    row = [image.getpixel((x, 1))[0] for x in range(image.width)]
    assert row[0] == 0 and row[-1] == 255
    assert all(b >= a for a, b in zip(row, row[1:], strict=False))
    assert sum(v == 255 for v in row) < 0.01 * len(row)
    assert abs(sum(row) / len(row) - 127.5) < 2


@pytest.mark.parametrize(
    "mode, low, high, fmt",
    [
        ("I;16", 0, 65_535, "PNG"),
        ("I;16", 0, 4_095, "PNG"),  # 12-bit data in a 16-bit file
        ("I;16", 0, 65_535, "TIFF"),
        ("I", -(2**31), 2**31 - 1, "TIFF"),
        ("I", 0, 1_000_000, "TIFF"),
        ("F", 0.0, 1.0, "TIFF"),
        ("F", -3.5, 1e6, "TIFF"),
    ],
)
def test_high_bit_depth_images_keep_their_range(tmp_path, mode, low, high, fmt):
    path = tmp_path / f"deep.{fmt.lower()}"
    source = gradient(mode, low, high)
    source.save(path, format=fmt)
    assert Image.open(path).mode == source.mode
    assert_ramp(open_image(path))
    assert_ramp(open_image(data_uri(path.read_bytes())))
    assert_ramp(prepare_image(source))


def test_non_finite_floats_clamp_and_flat_images_stay_flat():
    image = gradient("F", 0.0, 1.0)
    image.putpixel((0, 0), float("nan"))
    image.putpixel((1, 0), float("inf"))
    image.putpixel((2, 0), float("-inf"))
    out = prepare_image(image)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 255, 0]
    assert_ramp(out)
    assert prepare_image(Image.new("I;16", (8, 8), 40_000)).getextrema() == ((255, 255),) * 3
    assert prepare_image(Image.new("F", (8, 8), 0.0)).getextrema() == ((0, 0),) * 3


def test_the_processor_encodes_a_16_bit_image_as_open_image_gives_it(tiny):
    _, processor = tiny
    raw = gradient("I;16", 0, 65_535, width=112, height=56)
    text = ["<|vision_start|><|image_pad|><|vision_end|>"]
    direct = processor(text=text, images=[raw], return_tensors="pt")
    opened = processor(text=text, images=[open_image(raw)], return_tensors="pt")
    torch.testing.assert_close(direct["pixel_values"], opened["pixel_values"])
    assert direct["pixel_values"].std() > 0.5  # a ramp, not a white sheet


# ---- URLs and data URIs -------------------------------------------------------------------------------------


def test_data_uris_load_as_the_file_does(tiny, tmp_path):
    _, processor = tiny
    image = stripes((300, 200))
    uri = data_uri(png_bytes(image))
    assert open_image(uri).tobytes() == image.tobytes()
    jpeg = data_uri(png_bytes(image, "JPEG"), "image/jpeg")
    assert open_image(jpeg).size == (300, 200)
    for item in (
        {"type": "image", "url": uri},
        {"type": "image", "image": uri},
        {"type": "image_url", "image_url": {"url": uri}},
    ):
        inputs = chat_inputs(processor, conversation([item]))
        reference = chat_inputs(processor, conversation([{"type": "image", "image": image}]))
        assert torch.equal(inputs["input_ids"], reference["input_ids"])
        torch.testing.assert_close(inputs["pixel_values"], reference["pixel_values"])


def test_bad_data_uris_are_errors():
    with pytest.raises(ImageLoadError, match=r"data:image/png;base64,.*: not a readable image"):
        open_image(data_uri(b"not an image at all"))
    with pytest.raises(ImageLoadError, match=r"only base64 data URIs"):
        open_image("data:image/png,rawbytes")
    with pytest.raises(ImageLoadError, match=r"\(\d+ characters\): not a readable image"):
        open_image(data_uri(b"x" * 5_000))  # a long URI is named by its start and length


def test_data_uri_past_the_decompression_bomb_limit(monkeypatch):
    uri = data_uri(png_bytes(stripes((300, 300))))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    with pytest.raises(ImageLoadError, match="past PIL's decompression-bomb limit"):
        open_image(uri)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_url_is_an_error_naming_it(tiny):
    model, processor = tiny
    url = f"http://127.0.0.1:{closed_port()}/photos/cat.png"
    with pytest.raises(ImageLoadError, match=f"{url}: cannot download image"):
        open_image(url)
    with pytest.raises(ImageLoadError, match="cat.png: cannot download image"):
        chat_inputs(processor, conversation([{"type": "image", "url": url}]))
    with pytest.raises(ImageLoadError, match="cat.png: cannot download image"):
        model.chat(url, "What?", processor=processor)


@pytest.fixture
def served(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path (stopped after the test)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_urls_load_through_transformers_loader(tiny, tmp_path, served):
    _, processor = tiny
    image = stripes((280, 140))
    image.save(tmp_path / "stripes.png")
    (tmp_path / "page.html").write_text("<html>not found</html>")
    assert open_image(f"{served}/stripes.png").tobytes() == image.tobytes()
    inputs = chat_inputs(processor, conversation([{"type": "image", "url": f"{served}/stripes.png"}]))
    reference = chat_inputs(processor, conversation([{"type": "image", "image": image}]))
    torch.testing.assert_close(inputs["pixel_values"], reference["pixel_values"])
    with pytest.raises(ImageLoadError, match=r"page\.html: not a readable image"):
        open_image(f"{served}/page.html")


# ---- EXIF orientation ---------------------------------------------------------------------------------------


def oriented_jpeg(tmp_path, orientation: int):
    """A 60 x 20 picture, white at its left end, saved with an EXIF orientation tag."""
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"oriented{orientation}.jpg"
    image.save(path, exif=exif, quality=95)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_pil_image_straight_to_the_processor_is_encoded_upright(tiny, tmp_path, orientation):
    _, processor = tiny
    path = oriented_jpeg(tmp_path, orientation)
    upright = open_image(path)
    assert upright.size == ((20, 60) if orientation >= 5 else (60, 20))
    text = ["<|vision_start|><|image_pad|><|vision_end|>"]
    lazy = Image.open(path)  # as a user would pass it: not transposed
    direct = processor(text=text, images=[lazy], return_tensors="pt")
    opened = processor(text=text, images=[upright], return_tensors="pt")
    assert torch.equal(direct["image_grid_thw"], opened["image_grid_thw"])
    torch.testing.assert_close(direct["pixel_values"], opened["pixel_values"])
    assert prepare_image(upright) is upright  # applied once: an upright image is left alone


def test_the_chat_template_the_processor_and_the_crops_agree_on_orientation(tiny, tmp_path):
    model, processor = tiny
    path = oriented_jpeg(tmp_path, 6)
    lazy = Image.open(path)
    template = chat_inputs(processor, conversation([{"type": "image", "image": lazy}]))
    assert encoded_size(template)[1] > encoded_size(template)[0]  # portrait, as displayed
    shown = processor.fit_originals([lazy])[0]
    box = [0, 0, shown.width, shown.height // 3]
    policy = ScriptedPolicy(processor.tokenizer, [[tool_call_text([(0, box)], "top"), answer_text("A")]])
    answer, trace = model.chat(lazy, "What?", processor=processor, logits_processor=LogitsProcessorList([policy]))
    crop = trace.rounds[0].crops[0]
    assert answer == "A" and crop.getpixel((crop.width // 2, 2))[0] > 200  # the white end is on top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode):
    """As the authors' image loading (qwen-vl-utils) and transformers' image processors do: a transparent pixel is
    white, on the displayed image and on the crops, not the colour stored under it."""
    image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    image.paste((200, 30, 30, 255), (0, 0, 20, 20))  # left half opaque red, right half transparent black
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = image.getpixel((30, 10))
    opened = open_image(image)
    assert opened.mode == "RGB" and opened.getpixel((30, 10)) == (255, 255, 255)
    assert opened.getpixel((5, 5)) != (255, 255, 255)
