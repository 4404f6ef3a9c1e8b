"""The demo's accuracy table: single look (tools disabled) / after SFT / after GRPO, per task type, at two
initial pixel budgets, on held-out synthetic tasks (seeds from 10^7; training uses seeds below).

    python examples/accuracy_table.py --sft outputs/tiny-zoom/sft/final --grpo outputs/tiny-zoom/final [--n 500]

Each cell is `vilavt synth-eval --n N --type T [--no-tools] --initial-max-pixels P --model M`; the tasks
are drawn once per type and reused. Prints a markdown table and, as its last line, all results as JSON.
"""

import argparse
import json
import logging
import tempfile

from vilavt.demo import load, synth_eval

TYPES = ("single", "multi", "nested")
CHANCE = {"single": 0.25, "multi": 0.5, "nested": 0.25}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", required=True, help="checkpoint after SFT")
    parser.add_argument("--grpo", default=None, help="checkpoint after GRPO (default: the shipped one)")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--budgets", default="12544,50176", help="initial max pixels (112², 224²)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    models = {"sft": load(args.sft), "grpo": load(args.grpo)}
    variants = [("single look", "grpo", True), ("after SFT", "sft", False), ("after GRPO", "grpo", False)]
    results = {}
    with tempfile.TemporaryDirectory() as tasks:
        for budget in map(int, args.budgets.split(",")):
            for kind in TYPES:
                for label, name, no_tools in variants:
                    model, processor = models[name]
                    summary = synth_eval(model, processor, n=args.n, kinds=[kind], no_tools=no_tools,
                                         initial_max_pixels=budget, data_dir=tasks)  # fmt: skip
                    results[f"{budget}/{kind}/{label}"] = summary
                    print(f"{budget} {kind} {label}: {summary}", flush=True)
    print()
    for budget in map(int, args.budgets.split(",")):
        side = round(budget**0.5)
        print(f"initial budget {side}x{side} px, {args.n} tasks per type")
        print("| type | chance | " + " | ".join(label for label, _, _ in variants) + " | mean rounds (GRPO) |")
        print("|---|---|" + "---|" * len(variants) + "---|")
        for kind in TYPES:
            cells = [f"{100 * results[f'{budget}/{kind}/{label}']['accuracy']:.1f} %" for label, _, _ in variants]
            rounds = results[f"{budget}/{kind}/after GRPO"]["mean_rounds"]
            print(f"| {kind} | {100 * CHANCE[kind]:.0f} % | " + " | ".join(cells) + f" | {rounds:.2f} |")
        print()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
