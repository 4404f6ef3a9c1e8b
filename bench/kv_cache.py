"""Decoding step of the small model with transformers' DynamicCache (concatenates: copies the whole
cache every token) against the loop's GrowingCache (writes into spare capacity), at batch 1 and 8.

    python bench/kv_cache.py [--cached 3500] [--steps 30]

Each figure is the best of 3 timings of `--steps` decoding steps from a cache of `--cached` tokens per row.
The last line is a JSON object with the milliseconds per step and `speedup` (DynamicCache / GrowingCache).
"""

import argparse
import json
import time

import torch
from transformers.cache_utils import DynamicCache

from common import build
from vilavt.remote_code.cache_vilavt import CACHE_ARGUMENT, GrowingCache


@torch.no_grad()
def ms_per_step(model, cache_class, rows: int, cached: int, steps: int) -> float:
    text = model.config.text_config
    shape = (rows, text.num_key_value_heads, cached, text.hidden_size // text.num_attention_heads)
    best = float("inf")
    for _ in range(3):
        cache = cache_class()
        for layer in range(text.num_hidden_layers):
            cache.update(torch.randn(shape), torch.randn(shape), layer)
        mask = torch.ones(rows, cached, dtype=torch.long)
        token = torch.ones(rows, 1, dtype=torch.long)
        start = time.perf_counter()
        for step in range(steps):
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
            position = torch.full((3, rows, 1), cached + step)
            model(input_ids=token, attention_mask=mask, position_ids=position, **{CACHE_ARGUMENT: cache},
                  use_cache=True, logits_to_keep=1)  # fmt: skip
        best = min(best, (time.perf_counter() - start) / steps * 1000)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cached", type=int, default=3500)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    model, _ = build()
    ms_per_step(model, GrowingCache, 1, 64, 3)  # warm-up
    results = {}
    print(f"decoding step, {args.cached} cached tokens per row (ms)")
    print(f"  {'rows':>4}  {'DynamicCache':>12}  {'GrowingCache':>12}  speedup")
    for rows in (1, 8):
        dynamic = ms_per_step(model, DynamicCache, rows, args.cached, args.steps)
        growing = ms_per_step(model, GrowingCache, rows, args.cached, args.steps)
        results[f"batch{rows}"] = {"dynamic_ms": round(dynamic, 2), "growing_ms": round(growing, 2),
                                   "speedup": round(dynamic / growing, 2)}  # fmt: skip
        print(f"  {rows:>4}  {dynamic:>12.2f}  {growing:>12.2f}  {dynamic / growing:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
