"""The shipped tiny checkpoint and the commands around it: `vilavt chat`, `vilavt demo`, `vilavt synth-eval`.

The shipped checkpoint (`vilavt/assets/tiny-zoom`) is a tiny ViLaVT trained on the synthetic zoom task
(`vilavt.synthetic`) by vision pretraining (`vilavt.vision_pretraining`), a grounding warm-up of the LLM
(`vilavt.grounding_warmup`), then this project's SFT and GRPO;
reproduce it with `examples/train_tiny.py`. It is stored with
its weights, config and processor; `vilavt export` writes it (or any checkpoint) as a self-contained
remote-code folder.
"""

import logging
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SHIPPED = Path(__file__).parent / "assets" / "tiny-zoom"


class AnswerAfterThought:
    """Logits processor for a single look (with `<tool>` banned): once the model closes its thought it must
    open `<answer>`. A model trained to zoom otherwise writes its tool call without the tag and never
    answers, which measures its format, not what it can see."""

    def __init__(self, tokenizer):
        self.close = tokenizer.encode("</think>", add_special_tokens=False)
        self.answer = tokenizer.encode("<answer>", add_special_tokens=False)

    def __call__(self, input_ids, scores):
        import torch

        tail = input_ids[:, -(len(self.close) + len(self.answer)) :].tolist()  # all a match can span
        for row, ids in enumerate(tail):
            for written in range(len(self.answer)):  # `</think>` then the first `written` tokens of `<answer>`
                if ids[len(ids) - len(self.close) - written :] == self.close + self.answer[:written]:
                    forced = torch.full_like(scores[row], float("-inf"))
                    forced[self.answer[written]] = 0.0
                    scores[row] = forced
                    break
        return scores


def shipped_checkpoint() -> Path:
    if not (SHIPPED / "config.json").exists():
        raise FileNotFoundError(f"no shipped checkpoint at {SHIPPED}; pass --model")
    return SHIPPED


def load(model: str | None = None, backend: str = "transformers"):
    """(model, processor): a checkpoint folder or hub id, `tiny[:SEED]`, or by default the shipped checkpoint.
    `backend="vllm"`: the model is a `vilavt.vllm.api.ViLaVTVLLM` (same `generate` / `chat`) on a vLLM engine."""
    from .loading import load_model_and_processor
    from .validation import loading_model

    name = str(model or shipped_checkpoint())
    if backend == "vllm":
        from .vllm.api import ViLaVTVLLM  # raises VLLMBackendError (one line) without a usable vLLM

        with loading_model(name):
            engine = ViLaVTVLLM.load(name)
        return engine, engine.processor
    with loading_model(name):  # a corrupt checkpoint is one clear error, before anything loads
        model, processor = load_model_and_processor(name)
    return model.eval(), processor


def print_trace(trace, file=None) -> None:
    for number, rnd in enumerate(trace.rounds, 1):
        boxes = ", ".join(f"image {r['index']} {r['bbox_2d']}" for r in rnd.regions) or "-"
        print(f"round {number}: thought: {rnd.thought!r}", file=file)
        print(f"         query: {rnd.query!r}  boxes: {boxes}", file=file)
        if rnd.error:
            print(f"         error: {rnd.error}", file=file)
    print(f"answer: {trace.answer!r}  ({len(trace.rounds)} rounds, stop: {trace.stop_reason})", file=file)


def chat(images, question: str, model=None, out=None, max_rounds: int = 5, backend: str = "transformers"):
    """Ask a question about images; prints each round and the answer, draws the trace if `out`."""
    model, processor = load(model, backend)
    answer, trace = model.chat(images, question, processor=processor, max_rounds=max_rounds, max_new_tokens=1024)
    print_trace(trace)
    if out:
        print(f"trace: {trace.save_png(out)}")
    return answer, trace


def demo(seed: int = 1, kind: str = "single", out="vilavt-demo-trace.png", model=None):
    """Generate a synthetic task, let the model solve it, draw the trace."""
    from .synthetic import make_task

    model, processor = load(model)
    row, images = make_task(10_000_000 + seed, kind, processor)
    print(f"task: {row['question']} (gold answer: {row['answer']}; {len(images)} image(s) of "
          f"{', '.join(f'{w}x{h}' for w, h in (im.size for im in images))} px)")  # fmt: skip
    answer, trace = model.chat(images, row["question"], processor=processor, max_new_tokens=1024)
    print_trace(trace)
    path = trace.save_png(out)
    print(f"{'correct' if str(answer).strip() == row['answer'] else 'wrong'}; the trace picture is at {Path(path).resolve()}")
    return answer, trace


def synth_eval(
    model=None,
    processor=None,
    n: int = 100,
    seed: int = 10_000_000,
    kinds=("single",),
    no_tools: bool = False,
    initial_max_pixels: int | None = None,
    batch_size: int = 16,
    data_dir=None,
    max_rounds: int = 5,
    progress: bool = True,
) -> dict:
    """Accuracy on `n` held-out synthetic tasks through the chatting loop. `no_tools`: the model may not write
    `<tool>` and answers right after its thought (a single look, same model). `initial_max_pixels`: the
    originals' pixel budget. `data_dir` keeps the tasks, and reuses them when the same tasks were written
    there before. `progress`: a progress bar on stderr (answers done of `n`)."""
    from .benchmarks import run_eval
    from .synthetic import write_tasks

    if model is None:
        model, processor = load()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(data_dir or scratch)
        split = f"eval-{'-'.join(kinds)}-{seed}-{n}-{processor.max_pixels}"  # tasks are laid out for this budget
        path = folder / f"{split}.jsonl"
        if not path.exists():
            path = write_tasks(folder, n, seed, list(kinds), processor, split=split, workers=2)
        generate = {"max_new_tokens": 600}
        if no_tools:
            from transformers import LogitsProcessorList

            generate["bad_words_ids"] = [processor.tokenizer.encode("<tool>", add_special_tokens=False)]
            generate["logits_processor"] = LogitsProcessorList([AnswerAfterThought(processor.tokenizer)])
        summary = run_eval(
            path, folder, model, processor, batch_size=batch_size, max_rounds=0 if no_tools else max_rounds,
            max_pixels=initial_max_pixels, progress=progress, **generate,
        )  # fmt: skip
    return {
        "accuracy": summary["accuracy"],
        "n": summary["items_scored"],
        "mean_rounds": summary["mean_rounds"],
        "by_type": {name: entry["accuracy"] for name, entry in summary["categories"].items()},
    }


def export(src, dst) -> Path:
    """A self-contained remote-code folder from a checkpoint folder (e.g. the shipped one)."""
    import shutil

    from .checkpoints import copy_remote_code

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    copy_remote_code(dst)
    return dst


def synth_eval_table(summary: dict, label: str) -> str:
    rows = [(name, value) for name, value in summary["by_type"].items()] + [("overall", summary["accuracy"])]
    lines = [f"{label}: {summary['n']} tasks, mean rounds {summary['mean_rounds']:.2f}"]
    lines += [f"  {name:<8} {100 * value:6.1f} %" for name, value in rows]
    return "\n".join(lines)


__all__ = ["shipped_checkpoint", "load", "chat", "demo", "synth_eval", "export", "synth_eval_table"]
