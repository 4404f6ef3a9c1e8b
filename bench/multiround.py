"""Multi-round chatting benchmark: our incremental loop against the reference-style loop, against its
own limit, and batched against one-after-another. All ratios come from one process and one set of
weights; peak memory per variant comes from a fresh subprocess each.

    python bench/multiround.py [--repeats 3] [--image-side 1792]

Each time is the best of `--repeats` runs (noise on a shared machine only ever adds time); the 8 sequential
episodes run once, the batch of 8 `--repeats - 1` times.

Prints a table and, as its last line, a JSON object with
  p1_reprefill_over_incremental  time of incremental=False / time of ours (one 3-round episode)
  p2_round_over_limit            our cost of the tool rounds / the same work timed alone (encode only
                                 the new crops, prefill only the new tokens, decode the same tokens)
  p3_batched_speedup             8 rollouts of one prompt one after another / the same 8 as one batch
  peak_mb                        peak resident memory of each variant (MB above the loaded model)
"""

import argparse
import json
import subprocess
import sys
import time

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from common import build, run, script

SIDE = 1792  # 4096 image tokens, half the reference's evaluation budget (8192); the ratios grow with it


@torch.no_grad()
def limit(model, episode):
    """The same work as one episode, each part timed alone with no loop around it: prefill of the
    prompt, then per turn decode its sampled tokens one by one, encode the round's crops, prefill the
    tool-response tokens. Returns (prompt prefill seconds, everything-else seconds)."""
    from vilavt.remote_code.cache_vilavt import CACHE_ARGUMENT, GrowingCache
    from vilavt.remote_code.generation_vilavt import Episode, full_inputs

    ids = episode.ids
    prompt = Episode(ids[: episode.prompt_length], episode.pixel_rows[:1], episode.grids[:1], episode.query_ids[:1],
                     episode.query_mask[:1], [0], episode.ledger)
    inputs = full_inputs([prompt], 0)
    mm = model.model.mm_token_type_ids(inputs["input_ids"])
    positions, deltas = model.model.get_rope_index(inputs["input_ids"], mm, inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    start = time.perf_counter()
    # The loop's own cache type, so the limit differs from the loop only by the loop around the work.
    cache = GrowingCache()
    model(**inputs, position_ids=positions, **{CACHE_ARGUMENT: cache}, use_cache=True, logits_to_keep=1)
    prompt_seconds = time.perf_counter() - start

    # Consecutive runs of sampled / injected tokens after the prompt.
    runs, i = [], episode.prompt_length
    while i < len(ids):
        j = i
        while j < len(ids) and episode.sampled[j] == episode.sampled[i]:
            j += 1
        runs.append((episode.sampled[i], i, j))
        i = j
    position = int(positions.max()) + 1
    image_cursor, query_cursor, other = 1, 1, 0.0
    for sampled, i, j in runs:
        if sampled:
            # The token that ends a turn is fed with the tool response that follows it.
            for k in range(i, j - 1 if j < len(ids) else j):
                token = torch.tensor([[ids[k]]])
                pos = torch.full((3, 1, 1), position)
                start = time.perf_counter()
                model(input_ids=token, position_ids=pos, **{CACHE_ARGUMENT: cache}, use_cache=True)
                other += time.perf_counter() - start
                position += 1
            continue
        segment = ids[i - 1 : j]
        count = sum(1 for t in segment if t == model.config.vision_start_token_id)
        grids = episode.grids[image_cursor : image_cursor + count]
        encoder_outputs = None
        if count:
            start = time.perf_counter()
            features = model.model.get_image_features(
                torch.cat(episode.pixel_rows[image_cursor : image_cursor + count]),
                grids,
                query_ids=episode.query_ids[query_cursor][None],
                query_attention_mask=episode.query_mask[query_cursor][None],
                image_to_query_mapping=torch.zeros(count, dtype=torch.long),
            ).pooler_output
            other += time.perf_counter() - start
            encoder_outputs = {"image": BaseModelOutputWithPooling(pooler_output=(torch.cat(features),))}
            image_cursor, query_cursor = image_cursor + count, query_cursor + 1
        token_ids = torch.tensor([segment])
        seg_positions, _ = model.model.get_rope_index(token_ids, model.model.mm_token_type_ids(token_ids), grids if count else None)
        seg_positions = seg_positions + position
        start = time.perf_counter()
        model(input_ids=token_ids, position_ids=seg_positions, **{CACHE_ARGUMENT: cache}, use_cache=True,
              mm_encoder_outputs=encoder_outputs, logits_to_keep=1)
        other += time.perf_counter() - start
        position = int(seg_positions.max()) + 1
    return prompt_seconds, other


def best_time(fn, repeats):
    return min(fn() for _ in range(repeats))


def peak_memory(variant: str, side: int) -> float:
    """Peak RSS (MB) of `variant` above the loaded model, measured in a fresh process."""
    result = subprocess.run(
        [sys.executable, __file__, "--peak-memory", variant, "--image-side", str(side)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def measure_peak(variant: str, side: int) -> None:
    """Run one variant once in this fresh process; print its peak RSS above the loaded model."""
    model, processor = build(side)
    with open("/proc/self/clear_refs", "w") as refs:  # reset the high-water mark (VmHWM) to the current RSS
        refs.write("5")
    before = status_mb("VmRSS")
    if variant == "incremental":
        run(model, processor, [script()])
    elif variant == "reprefill":
        run(model, processor, [script()], incremental=False)
    elif variant == "batched8":
        run(model, processor, [script(v) for v in range(8)])
    elif variant == "sequential8":
        for v in range(8):
            run(model, processor, [script(v)])
    print(status_mb("VmHWM") - before)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-side", type=int, default=SIDE, help="the image is shown at side x side (a multiple of 28)")
    parser.add_argument("--peak-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.image_side % 28 or args.image_side < 896:
        parser.error("--image-side must be a multiple of 28, at least 896")
    side = args.image_side
    if args.peak_memory:
        measure_peak(args.peak_memory, side)
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, processor = build(side)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    run(model, processor, [script()])  # warm-up

    pairs = [
        (run(model, processor, [script()])[0], run(model, processor, [script()], incremental=False)[0])
        for _ in range(args.repeats)
    ]  # interleaved, so drift in the machine's speed hits both variants alike
    ours = min(p[0] for p in pairs)
    reprefill = min(p[1] for p in pairs)
    _, output = run(model, processor, [script()])
    episode = output.episodes[0]
    parts = [limit(model, episode) for _ in range(args.repeats)]
    prompt_seconds = min(p for p, _ in parts)
    limit_seconds = min(o for _, o in parts)
    rounds_ours = ours - prompt_seconds

    sequential = best_time(lambda: sum(run(model, processor, [script(v)])[0] for v in range(8)), 1)
    batched = best_time(lambda: run(model, processor, [script(v) for v in range(8)])[0], max(1, args.repeats - 1))

    trace = output.traces[0]
    peaks = {name: peak_memory(name, side) for name in ("incremental", "reprefill", "sequential8", "batched8")}
    results = {
        "p1_reprefill_over_incremental": round(reprefill / ours, 2),
        "p2_round_over_limit": round(rounds_ours / limit_seconds, 3),
        "p3_batched_speedup": round(sequential / batched, 2),
        "peak_mb": {k: round(v, 1) for k, v in peaks.items()},
        "seconds": {
            "incremental": round(ours, 3),
            "reprefill": round(reprefill, 3),
            "prompt_prefill": round(prompt_seconds, 3),
            "rounds_ours": round(rounds_ours, 3),
            "rounds_limit": round(limit_seconds, 3),
            "sequential8": round(sequential, 3),
            "batched8": round(batched, 3),
        },
        "setup": {
            "params_m": round(params, 1),
            "image": f"{side}x{side}",
            "image_tokens": int((episode.grids[0][1] * episode.grids[0][2]) // 4),
            "rounds": len(trace.rounds),
            "crops": sum(len(r.crops) for r in trace.rounds),
            "sampled_tokens": trace.generated_tokens,
            "injected_tokens": trace.injected_tokens,
            "sequence_tokens": len(episode.ids),
            "threads": torch.get_num_threads(),
        },
    }
    rows = [
        ("one 3-round episode, ours (incremental)", f"{ours:.3f} s", ""),
        ("same episode, reference-style re-prefill", f"{reprefill:.3f} s", f"p1 = {results['p1_reprefill_over_incremental']}x"),
        ("tool rounds, ours (episode - prompt prefill)", f"{rounds_ours:.3f} s", ""),
        ("tool rounds, limit (encode + prefill + decode alone)", f"{limit_seconds:.3f} s", f"p2 = {results['p2_round_over_limit']}"),
        ("8 rollouts of one prompt, one after another", f"{sequential:.3f} s", ""),
        ("the same 8 as one batch", f"{batched:.3f} s", f"p3 = {results['p3_batched_speedup']}x"),
    ]
    print(f"ViLaVT multi-round benchmark: {params:.1f} M parameters, {side}x{side} image "
          f"({results['setup']['image_tokens']} image tokens), {len(trace.rounds)} rounds, "
          f"{results['setup']['crops']} crops, {trace.generated_tokens} sampled + {trace.injected_tokens} injected tokens, "
          f"{torch.get_num_threads()} threads")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>10}  {note}")
    print("  peak memory above the loaded model (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
