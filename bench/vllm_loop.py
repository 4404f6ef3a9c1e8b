"""The ViLaVT chatting loop on transformers vs on vLLM: same checkpoint, same scripted 3-round episodes, one run.

    bash bench/vllm_loop.sh [--image-side 1792] [--batches 1,8,32]

Prints, per batch size, the sampled tokens per second of both loops; per round, vLLM's prefix-cache hit
rate (its own `num_cached_tokens`) with this backend's hashing and with the authors' (every query in every
image's hash); the images the vision encoder ran on (ours against the authors' hashing). The last line is a
JSON object.
On CPU this shows correctness and cache behaviour, not the GPU speed case (paged attention, continuous
batching, CUDA graphs).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for key, value in {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "TORCHDYNAMO_DISABLE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}.items():
    os.environ.setdefault(key, value)

sys.path.insert(0, str(Path(__file__).parent))
from common import build, inputs_for, run, script  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402

from vilavt.scripted import ScriptedPolicy  # noqa: E402


def vllm_run(engine, processor, scripts, seeds, hashing="per_image"):
    engine.llm.reset_prefix_cache()
    engine.llm.apply_model(lambda m: m.encoder_log.clear())
    inputs, images = inputs_for(processor, seeds)
    started = time.perf_counter()
    output = engine.generate(
        **inputs, images=images, max_new_tokens=6000, return_dict_in_generate=True, hashing=hashing,
        logits_processor_factory=lambda row: LogitsProcessorList([ScriptedPolicy(processor.tokenizer, [scripts[row]])]),
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert all(t.stop_reason == "answer" and len(t.rounds) == 3 for t in output.traces)
    encoded = [n for log in engine.llm.apply_model(lambda m: list(m.encoder_log)) for n in log]
    return elapsed, output, encoded


def per_round(output, attribute):
    rounds = max(len(ep.vllm_requests) for ep in output.episodes)
    return [
        sum(getattr(ep.vllm_requests[k], attribute) for ep in output.episodes if k < len(ep.vllm_requests))
        for k in range(rounds)
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-side", type=int, default=1792, help="side of the original (1792: 4096 image tokens)")
    parser.add_argument("--batches", default="1,8,32")
    args = parser.parse_args()
    from vilavt.vllm.api import ViLaVTVLLM, load_engine

    model, processor = build(args.image_side)
    folder = Path(tempfile.mkdtemp(prefix="vilavt-vllm-bench-"))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    engine = ViLaVTVLLM(
        load_engine(folder, dtype="float32", enforce_eager=True, block_size=32, seed=0), processor
    )
    batches = [int(b) for b in args.batches.split(",")]
    result, identical = {}, True
    print(f"{'batch':>6} {'transformers tok/s':>20} {'vLLM tok/s':>12} {'ratio':>7}")
    for batch in batches:
        scripts = [script(row % 4) for row in range(batch)]
        seeds = [row % max(1, batch // 4) for row in range(batch)]  # several rollouts per prompt, as in GRPO
        hf_seconds, hf = run(model, processor, scripts, seeds=seeds)
        vl_seconds, vl, encoded = vllm_run(engine, processor, scripts, seeds)
        identical &= all(a.ids == b.ids and a.sampled == b.sampled for a, b in zip(hf.episodes, vl.episodes))
        sampled = sum(sum(ep.sampled) for ep in vl.episodes)
        hf_rate, vl_rate = sampled / hf_seconds, sampled / vl_seconds
        print(f"{batch:>6} {hf_rate:>20.1f} {vl_rate:>12.1f} {vl_rate / hf_rate:>6.2f}x")
        result[f"tokens_per_s_transformers_b{batch}"] = round(hf_rate, 2)
        result[f"tokens_per_s_vllm_b{batch}"] = round(vl_rate, 2)
        if batch == batches[0]:
            ours = (vl, encoded)

    vl, encoded = ours
    scripts, seeds = [script(0)], [0]
    _, authors, authors_encoded = vllm_run(engine, processor, scripts, seeds, hashing="authors")
    prompt, cached = per_round(vl, "prompt_tokens"), per_round(vl, "cached_tokens")
    a_prompt, a_cached = per_round(authors, "prompt_tokens"), per_round(authors, "cached_tokens")
    hit = [c / p for c, p in zip(cached, prompt)]
    a_hit = [c / p for c, p in zip(a_cached, a_prompt)]
    # What a prefix cache can serve at best: the tokens the previous request already held (its prompt and its
    # sampled tokens), i.e. the prompt minus the tool response just appended.
    injected = [0] + [sum(ep.trace.rounds[k].injected_tokens for ep in vl.episodes if k < len(ep.trace.rounds))
                      for k in range(len(prompt) - 1)]  # fmt: skip
    ceiling = [(p - i) / p for p, i in zip(prompt, injected)]
    new_images = per_round(vl, "new_images")
    print("\nround  prompt tokens  reusable  prefix-cache hits (ours)  (authors' hashing)")
    for k in range(len(prompt)):
        reusable = f"{100 * ceiling[k]:>8.1f} %" if k else f"{'-':>10}"  # round 1 has no previous request
        print(f"{k + 1:>5} {prompt[k]:>14} {reusable} {100 * hit[k]:>22.1f} % {100 * a_hit[k]:>18.1f} %")
    # Every image is encoded at least once, so a total equal to the number of images means none was encoded twice.
    print(f"\nimages encoded: ours {sum(encoded)} in {len(encoded)} encoder calls {encoded} (new images per round: "
          f"{new_images}); with the authors' hashing {sum(authors_encoded)} in {len(authors_encoded)} calls")
    result.update(
        tokens_identical=bool(identical),
        prefix_cache_hit_min=round(min(hit[1:]), 4),
        prefix_cache_hit_per_round=[round(h, 4) for h in hit],
        prefix_cache_hit_of_reusable_min=round(min(h / c for h, c in zip(hit[1:], ceiling[1:])), 4),
        prefix_cache_hit_min_authors_hashing=round(min(a_hit[1:]), 4),
        new_images_per_round=new_images,
        encoder_images_per_call=encoded,
        encoder_images_authors_hashing=sum(authors_encoded),
        encoder_only_new_crops=sum(encoded) == sum(new_images),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
