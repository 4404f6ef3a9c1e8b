"""The `vilavt` command.

    vilavt demo [--seed S] [--type single|multi|nested] [--out PNG]         the shipped model solves a synthetic task
    vilavt chat --image PATH [--image PATH ...] --question TEXT [--model M] [--out PNG]
    vilavt synth-eval --n N --seed S [--type T] [--no-tools] [--initial-max-pixels P] [--model M] [--no-progress]
    vilavt init --base QWEN2_5_VL --encoder QWEN3_EMBEDDING --out DIR     assemble a starting checkpoint
    vilavt synth-data --out DIR [--n N]                                      synthetic SFT trajectories + GRPO questions
    vilavt sft  --config FILE.yaml [--key value ...]                         stage 1 (TRL SFTTrainer; --help: every key)
    vilavt grpo --config FILE.yaml [--key value ...]                         stage 2 (TRL GRPOTrainer; --help: every key)
    vilavt eval --benchmark FILE.json --image-root DIR --model M [...]      the paper's benchmarks
    vilavt convert SRC DST [--tokenizer DIR] [--query-tokenizer DIR] [--prompts-from REPO]
                                                                             official checkpoint -> plug-in folder
    vilavt prompts import REPO DIR [--variant rl|vllm-eval] [--on-error final|end|budget]
                                                                             the authors' prompt wording -> checkpoint
    vilavt export DST [--src SRC]                                            a self-contained remote-code folder
    vilavt push DIR REPO_ID [--private] [--dry-run] [--base-model ID ...]   upload a checkpoint folder

Any key of a run config can be overridden on the command line (`--max_steps 3`, `--lora_r 8`). For several
processes, launch through accelerate: `accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml
-m vilavt.cli sft --config examples/configs/sft_7b.yaml` (on CPU: examples/accelerate/cpu_ddp.yaml).

Errors in what you give a command (files, folders, values) are one line on stderr, `vilavt CMD: error: ...`,
with exit status 2; `vilavt --debug CMD ...` (or VILAVT_DEBUG=1) shows their traceback. Anything else is a
bug and shows its traceback.
"""

import argparse
import json
import logging
import os
import sys

from .arguments import CommandParser, choice_list, int_at_least, int_list, positive_float


def _train(stage: str, argv: list[str]) -> int:
    from .train.config import ConfigError, parse_run_config

    # accelerate's single-process launcher (what `--cpu` picks) sets ACCELERATE_DYNAMO_BACKEND but no WORLD_SIZE.
    launched_alone = "ACCELERATE_DYNAMO_BACKEND" in os.environ and "WORLD_SIZE" not in os.environ
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and launched_alone:
        logging.getLogger("vilavt").warning(
            "training in ONE CPU process: `accelerate launch --cpu` uses the single-process launcher whatever "
            "--num_processes says. Several CPU processes: ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch "
            "--config_file examples/accelerate/cpu_ddp.yaml -m vilavt.cli %s ...", stage
        )
    try:
        config = parse_run_config(stage, argv)
    except ConfigError as err:
        print(f"vilavt {stage}: error: {err}", file=sys.stderr)
        return 2
    if stage == "sft":
        from .train.sft import run_sft as run
    else:
        from .train.grpo import run_grpo as run
    from .loading import ModelLoadError
    from .remote_code.processing_vilavt import ImageLoadError
    from .trajectories import TrajectoryError

    try:
        folder = run(config)
    except (ConfigError, ModelLoadError, TrajectoryError, ImageLoadError) as err:
        print(f"vilavt {stage}: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:  # one line, not one per process
        print(f"saved {folder}")
    return 0


def _synth_data(argv: list[str]) -> int:
    parser = CommandParser(
        prog="vilavt synth-data", description="synthetic zoom tasks for the training quickstart (train.jsonl + rl.jsonl)"
    )
    parser.add_argument("--out", required=True, help="folder (examples/configs/*_tiny.yaml read outputs/synth)")
    parser.add_argument("--n", type=int_at_least(1), default=200, help="gold trajectories for SFT (every task kind)")
    parser.add_argument("--rl-n", type=int_at_least(1), default=None, help="questions with answers for GRPO (default: --n)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="first task seed (held-out tasks start at 10^7)")
    parser.add_argument("--model", default="tiny-demo", help="the model whose image budget the tasks are laid out for")
    parser.add_argument("--workers", type=int_at_least(1), default=1, help="processes drawing the images")
    args = parser.parse_args(argv)
    from .loading import load_model_and_processor
    from .synthetic import write_training_sets

    _, processor = load_model_and_processor(args.model)
    for split, path in write_training_sets(args.out, args.n, processor, args.rl_n, args.seed, args.workers).items():
        print(f"wrote {path} ({split})")
    return 0


def _init(argv: list[str]) -> int:
    parser = CommandParser(prog="vilavt init", description="Qwen2.5-VL + Qwen3 encoder -> ViLaVT checkpoint")
    parser.add_argument("--base", required=True, help="Qwen2.5-VL checkpoint folder")
    parser.add_argument("--encoder", required=True, help="Qwen3 (embedding) model folder, with its tokenizer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--integration-point", default="late")
    parser.add_argument("--fullatt-block-indexes", type=int_list, default=[7, 15], help="comma-separated, e.g. 7,15")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .checkpoints import init_from_base

    out = init_from_base(
        args.base,
        args.encoder,
        args.out,
        integration_point=args.integration_point,
        fullatt_block_indexes=args.fullatt_block_indexes,
        dtype=args.dtype,
        seed=args.seed,
    )
    print(f"saved {out}")
    return 0


def _demo(argv: list[str]) -> int:
    parser = CommandParser(prog="vilavt demo", description="the shipped tiny model solves a synthetic zoom task")
    parser.add_argument("--seed", type=int, default=1, help="which held-out task (any seed: a new task)")
    parser.add_argument("--type", default="single", choices=("single", "multi", "nested"))
    parser.add_argument("--out", default="vilavt-demo-trace.png")
    parser.add_argument("--model", default=None, help="default: the shipped checkpoint")
    args = parser.parse_args(argv)
    from .demo import demo

    demo(args.seed, args.type, args.out, args.model)
    return 0


def _chat(argv: list[str]) -> int:
    parser = CommandParser(prog="vilavt chat", description="ask a question about images")
    parser.add_argument("--image", action="append", required=True, help="an image file (repeat for several)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the shipped one)")
    parser.add_argument("--out", default=None, help="write the trace picture here")
    parser.add_argument("--max-rounds", type=int_at_least(0), default=5)
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    args = parser.parse_args(argv)
    from .demo import chat
    from .remote_code.processing_vilavt import open_image

    images = [open_image(image) for image in args.image]  # a bad image fails before the model loads
    chat(images, args.question, args.model, args.out, args.max_rounds, args.backend)
    return 0


def _synth_eval(argv: list[str]) -> int:
    from .synthetic import CURRICULUM, KINDS

    parser = CommandParser(prog="vilavt synth-eval", description="accuracy on held-out synthetic zoom tasks")
    parser.add_argument("--n", type=int_at_least(1), default=100, help="tasks")
    parser.add_argument("--seed", type=int_at_least(0), default=10_000_000,
                        help="first task seed (training uses seeds below 10^7)")  # fmt: skip
    parser.add_argument("--type", type=choice_list(KINDS + CURRICULUM), default=["single"],
                        help="single, multi, nested (or direct), or a comma-separated mix")  # fmt: skip
    parser.add_argument("--no-tools", action="store_true", help="a single look: the model may not call the tool")
    parser.add_argument("--initial-max-pixels", type=int_at_least(1), default=None,
                        help="pixel budget of the original images (default: the processor's max_pixels)")  # fmt: skip
    parser.add_argument("--model", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    args = parser.parse_args(argv)
    from .demo import load, synth_eval, synth_eval_table

    model, processor = load(args.model, args.backend)
    summary = synth_eval(
        model, processor, args.n, args.seed, args.type, args.no_tools, args.initial_max_pixels, args.batch_size,
        progress=not args.no_progress,
    )  # fmt: skip
    label = f"{'single look (no tools)' if args.no_tools else 'with tools'}, initial budget {args.initial_max_pixels or processor.max_pixels} px"
    print(synth_eval_table(summary, label))
    print(json.dumps(summary))
    return 0


def _export(argv: list[str]) -> int:
    parser = CommandParser(prog="vilavt export", description="checkpoint folder -> self-contained remote-code folder")
    parser.add_argument("dst")
    parser.add_argument("--src", default=None, help="checkpoint folder (default: the shipped checkpoint)")
    args = parser.parse_args(argv)
    from .demo import export, shipped_checkpoint

    print(f"saved {export(args.src or shipped_checkpoint(), args.dst)}")
    return 0


def _eval(argv: list[str]) -> int:
    """Prints the per-category table, then the JSON summary as the last line (with --dry-run, only the
    dry-run JSON)."""
    parser = CommandParser(prog="vilavt eval", description="Evaluate a ViLaVT model on a benchmark file")
    parser.add_argument("--benchmark", required=True, help="benchmark JSON (or JSONL) file")
    parser.add_argument("--image-root", required=True, help="folder the benchmark's image paths are relative to")
    parser.add_argument("--model", help="checkpoint folder, or tiny / tiny:SEED (required unless --dry-run)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=1)
    parser.add_argument("--max-rounds", type=int_at_least(0), default=5, help="tool calls allowed per answer")
    parser.add_argument("--avg-k", type=int_at_least(1), default=1,
                        help="samples per item (Avg@k; sampling when k > 1)")  # fmt: skip
    parser.add_argument("--limit", type=int_at_least(1), default=None, help="only the first N items")
    parser.add_argument("--out", default=None, help="results JSONL (resumable; default BENCHMARK.MODEL.results.jsonl)")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=None, help="all new tokens of one answer")
    parser.add_argument("--temperature", type=positive_float, default=None, help="sampling temperature")
    parser.add_argument("--max-pixels", type=int_at_least(1), default=None,
                        help="pixel budget the original images share")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true", help="build every question and check images; no model")
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers",
                        help="vllm: the chatting loop on a vLLM engine (vilavt.vllm)")  # fmt: skip
    parser.add_argument("--instructions", metavar="FILE.json",
                        help="problem type -> instruction after the question (replaces this project's wording)")
    args = parser.parse_args(argv)
    if not args.dry_run and not args.model:
        parser.error("--model is required (or use --dry-run)")
    from pathlib import Path

    from .benchmarks import (
        benchmark_name, default_out_path, dry_run, format_table, load_benchmark, load_instructions, read_results,
        run_eval,
    )  # fmt: skip

    instructions = load_instructions(args.instructions) if args.instructions else None
    if args.dry_run:
        print(json.dumps(dry_run(args.benchmark, args.image_root)))
        return 0
    out = Path(args.out) if args.out else default_out_path(args.benchmark, args.model)
    # A broken results or benchmark file fails before the model loads (run_eval reads them again, and warns).
    read_results(out, benchmark_name(args.benchmark), warn=False)
    load_benchmark(args.benchmark)
    from .demo import load

    model, processor = load(args.model, args.backend)
    generate_kwargs = {} if args.temperature is None else {"temperature": args.temperature}
    summary = run_eval(
        args.benchmark, args.image_root, model, processor,
        batch_size=args.batch_size, max_rounds=args.max_rounds, avg_k=args.avg_k, limit=args.limit,
        out_path=out, progress=not args.no_progress, max_new_tokens=args.max_new_tokens,
        max_pixels=args.max_pixels, instructions=instructions, **generate_kwargs,
    )  # fmt: skip
    print(format_table(summary))
    print(f"results: {out}")
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def add_prompt_variant_arguments(parser) -> None:
    parser.add_argument("--variant", default="rl", choices=("rl", "vllm-eval"),
                        help="rl: what the released model was trained on; vllm-eval: their vLLM evaluator's prompts")
    parser.add_argument("--on-error", default="final", choices=("final", "end", "budget"),
                        help="a failed tool call: error then the final text (their evaluators), end the episode "
                             "(their RL rollout) or error then continue by the round budget (this project)")


def _convert(argv: list[str]) -> int:
    parser = CommandParser(prog="vilavt convert", description="official ViLaVT checkpoint -> plug-in folder")
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--tokenizer", help="folder with the Qwen2.5-VL tokenizer, if SRC has none")
    parser.add_argument("--query-tokenizer", help="Qwen3-Embedding tokenizer folder (default: derived from the main one)")
    parser.add_argument("--prompts-from", metavar="REPO", help="your checkout of the authors' repository: import their prompt wording")
    add_prompt_variant_arguments(parser)
    args = parser.parse_args(argv)
    from .checkpoints import convert_official
    from .prompts import PromptImportError, authors_wording_notice, import_authors_prompts

    try:
        prompts = import_authors_prompts(args.prompts_from, args.variant, args.on_error) if args.prompts_from else None
    except PromptImportError as err:
        print(f"vilavt convert: error: {err}", file=sys.stderr)
        return 2
    print(f"saved {convert_official(args.src, args.dst, args.tokenizer, args.query_tokenizer, prompts=prompts)}")
    if prompts is None:
        print(authors_wording_notice(args.dst), file=sys.stderr)
    return 0


def _prompts(argv: list[str]) -> int:
    parser = CommandParser(prog="vilavt prompts", description="prompt wording a checkpoint carries")
    commands = parser.add_subparsers(dest="command", required=True)
    imports = commands.add_parser("import", help="the authors' wording from your checkout of their repository")
    imports.add_argument("repo", help="a checkout of the authors' ViLaVT repository (parsed, never run)")
    imports.add_argument("dir", help="a checkpoint folder: gets prompt_templates.json")
    add_prompt_variant_arguments(imports)
    args = parser.parse_args(argv)
    from .prompts import PromptImportError, import_authors_prompts, write_prompts

    try:
        path = write_prompts(import_authors_prompts(args.repo, args.variant, args.on_error), args.dir)
    except PromptImportError as err:
        print(f"vilavt prompts: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}: the authors' wording ({args.variant}; on a failed tool call: {args.on_error})")
    return 0


def _push(argv: list[str]) -> int:
    parser = CommandParser(prog="vilavt push", description="upload a checkpoint folder to the Hub")
    parser.add_argument("folder")
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--message", default="Upload ViLaVT")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded; write nothing")
    parser.add_argument("--base-model", action="append", default=None, metavar="ID",
                        help="the model card's base_model (repeat for several; default: what the folder records)")  # fmt: skip
    args = parser.parse_args(argv)
    from pathlib import Path

    from .hub import CARD, push

    adds_card = not (Path(args.folder) / CARD).exists()
    files = push(args.folder, args.repo_id, private=args.private, commit_message=args.message, dry_run=args.dry_run,
                 base_model=args.base_model)  # fmt: skip
    for name in files:
        added = f"  ({'would add' if args.dry_run else 'added'}: the model card)" if name == CARD and adds_card else ""
        print(name + added)
    print(f"{'would upload' if args.dry_run else 'uploaded'} {len(files)} files to {args.repo_id}")
    return 0


COMMANDS = {
    "demo": _demo,
    "chat": _chat,
    "synth-eval": _synth_eval,
    "init": _init,
    "synth-data": _synth_data,
    "sft": lambda argv: _train("sft", argv),
    "grpo": lambda argv: _train("grpo", argv),
    "eval": _eval,
    "convert": _convert,
    "prompts": _prompts,
    "export": _export,
    "push": _push,
}


def main(argv: list[str] | None = None) -> int:
    """Run a `vilavt` command. Bad input (`vilavt.errors.is_expected`) is one line on stderr and exit status 2;
    `--debug` before the command (or VILAVT_DEBUG=1) re-raises it with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("VILAVT_DEBUG", "").lower() not in ("", "0", "false", "no")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"vilavt: error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (see vilavt --help)",
                  file=sys.stderr)  # fmt: skip
            return 2
        print(__doc__.strip())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels it cannot find
    from .errors import is_expected, one_line

    try:
        return COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"vilavt {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or not is_expected(err):
            raise
        print(f"vilavt {argv[0]}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
