"""GRPO rollout benchmark: one generation batch of a GRPO step (2 prompts x 4 generations, scripted
3-round episodes) produced TRL-style (every round re-prefills each conversation and re-encodes all its
images) against ViLaVT's loop (live KV cache, only new crops encoded). Same weights, same run.

    python bench/rollout.py [--repeats 2] [--image-side 1344]

Each time is the best of `--repeats` runs.

The last line is a JSON object with `p5_rollout_speedup` = TRL-style time / our time.
"""

import argparse
import json

from common import IMAGE_SIDE, build, run, script

PROMPTS, GENERATIONS = 2, 4


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--image-side", type=int, default=IMAGE_SIDE, help="the images are shown at side x side (a multiple of 28)")
    args = parser.parse_args()
    side = args.image_side
    model, processor = build(side)
    seeds = [p for p in range(PROMPTS) for _ in range(GENERATIONS)]
    scripts = [script(v % GENERATIONS) for v in range(len(seeds))]
    run(model, processor, scripts[:2], seeds=seeds[:2])  # warm-up
    pairs = [
        (run(model, processor, scripts, seeds=seeds)[0], run(model, processor, scripts, incremental=False, seeds=seeds)[0])
        for _ in range(args.repeats)
    ]
    ours = min(p[0] for p in pairs)
    reprefill = min(p[1] for p in pairs)
    results = {
        "p5_rollout_speedup": round(reprefill / ours, 2),
        "seconds": {"ours": round(ours, 3), "trl_style_reprefill": round(reprefill, 3)},
        "setup": {"prompts": PROMPTS, "generations": GENERATIONS, "rounds": 3, "image": f"{side}x{side}"},
    }
    print(f"GRPO rollout phase: {PROMPTS} prompts x {GENERATIONS} generations, 3 tool rounds each, {side}px images")
    print(f"  TRL-style re-prefill generation  {reprefill:8.3f} s")
    print(f"  ViLaVT loop (ours)               {ours:8.3f} s   p5 = {results['p5_rollout_speedup']}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
