"""The `vilavt` command.

    vilavt init --base QWEN2_5_VL --encoder QWEN3_EMBEDDING --out DIR     assemble a starting checkpoint
    vilavt sft  --config FILE.yaml [--key value ...]                         stage 1 (TRL SFTTrainer)
    vilavt grpo --config FILE.yaml [--key value ...]                         stage 2 (TRL GRPOTrainer)

Any key of a run config can be overridden on the command line (`--max_steps 3`, `--lora.r 8`). For several
GPUs, launch through accelerate: `accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml
-m vilavt.cli sft --config examples/configs/sft_7b.yaml`.
"""

import argparse
import logging
import os
import sys


def _train(stage: str, argv: list[str]) -> int:
    from .train.common import load_run_config, parse_overrides

    parser = argparse.ArgumentParser(prog=f"vilavt {stage}", description=f"{stage.upper()} from a run config")
    parser.add_argument("--config", required=True, help="YAML run config (see examples/configs)")
    args, rest = parser.parse_known_args(argv)
    config = load_run_config(args.config, parse_overrides(rest))
    if stage == "sft":
        from .train.sft import run_sft as run
    else:
        from .train.grpo import run_grpo as run
    print(f"saved {run(config)}")
    return 0


def _init(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vilavt init", description="Qwen2.5-VL + Qwen3 encoder -> ViLaVT checkpoint")
    parser.add_argument("--base", required=True, help="Qwen2.5-VL checkpoint folder")
    parser.add_argument("--encoder", required=True, help="Qwen3 (embedding) model folder, with its tokenizer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--integration-point", default="late")
    parser.add_argument("--fullatt-block-indexes", default="7,15", help="comma-separated")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .checkpoints import init_from_base

    out = init_from_base(
        args.base,
        args.encoder,
        args.out,
        integration_point=args.integration_point,
        fullatt_block_indexes=[int(i) for i in args.fullatt_block_indexes.split(",") if i],
        dtype=args.dtype,
        seed=args.seed,
    )
    print(f"saved {out}")
    return 0


COMMANDS = {
    "init": _init,
    "sft": lambda argv: _train("sft", argv),
    "grpo": lambda argv: _train("grpo", argv),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels it cannot find
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
