"""What a generation records: each tool round (thought, query, boxes, crops, token counts, timings) and the
whole sequence's answer and stop reason, and the picture that shows it."""

from dataclasses import dataclass, field

from PIL import Image, ImageDraw


@dataclass
class RoundTrace:
    """One tool call: what the model asked for and what it got back."""

    thought: str | None
    query: str | None
    regions: list[dict]  # index, bbox_2d (displayed pixels), source original, box_in_original (pixels)
    crops: list  # displayed-size PIL crops
    crop_indices: list[int]
    error: str | None
    notes: list[str]
    generated_tokens: int  # sampled in the turn that made the call
    injected_tokens: int  # tool-response tokens appended (text + image)
    seconds_decode: float
    seconds_tool: float  # parse + crop + render + encode


@dataclass
class Trace:
    """Everything one sequence did; `save_png` draws it."""

    originals: list  # full-resolution PIL images
    rounds: list[RoundTrace] = field(default_factory=list)
    answer: str | None = None
    final_turn: str = ""
    text: str = ""  # the whole completion, decoded
    stop_reason: str = ""
    generated_tokens: int = 0
    injected_tokens: int = 0
    seconds: float = 0.0

    def save_png(self, path, max_side: int = 640) -> str:
        """Draw the original image(s) with every round's boxes (labelled by round) and the crops."""
        draw_trace(self, max_side).save(path)
        return str(path)


def draw_trace(trace: Trace, max_side: int = 640) -> Image.Image:
    """The original image(s) with every round's boxes (labelled by round) above the crops, and a caption."""
    colors = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]
    panels = []
    for source, original in enumerate(trace.originals):
        scale = min(1.0, max_side / max(original.size))
        panel = original.convert("RGB").resize(
            (max(1, round(original.width * scale)), max(1, round(original.height * scale)))
        )
        draw = ImageDraw.Draw(panel)
        for number, rnd in enumerate(trace.rounds, 1):
            for region in rnd.regions:
                if region.get("source") != source:
                    continue
                box = [v * scale for v in region["box_in_original"]]
                color = colors[(number - 1) % len(colors)]
                draw.rectangle(box, outline=color, width=3)
                draw.text((box[0] + 3, box[1] + 2), f"r{number}", fill=color)
        draw.text((4, 4), f"image {source}", fill="#000000")
        panels.append(panel)
    crops = []
    for number, rnd in enumerate(trace.rounds, 1):
        for index, crop in zip(rnd.crop_indices, rnd.crops):
            scale = min(1.0, (max_side // 2) / max(crop.size))
            tile = crop.convert("RGB").resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
            ImageDraw.Draw(tile).text((3, 2), f"r{number}: image {index}", fill=colors[(number - 1) % len(colors)])
            crops.append(tile)
    pad = 8
    top_h = max((p.height for p in panels), default=0)
    bottom_h = max((c.height for c in crops), default=0)
    width = max(sum(p.width for p in panels), sum(c.width for c in crops)) + pad * (max(len(panels), len(crops)) + 1)
    caption = f"answer: {trace.answer!r}  ({len(trace.rounds)} rounds, stop: {trace.stop_reason})"
    canvas = Image.new("RGB", (max(width, 320), top_h + bottom_h + 3 * pad + 16), "white")
    x = pad
    for panel in panels:
        canvas.paste(panel, (x, pad))
        x += panel.width + pad
    x = pad
    for tile in crops:
        canvas.paste(tile, (x, top_h + 2 * pad))
        x += tile.width + pad
    ImageDraw.Draw(canvas).text((pad, top_h + bottom_h + 2 * pad), caption, fill="#000000")
    return canvas


__all__ = ["RoundTrace", "Trace", "draw_trace"]
