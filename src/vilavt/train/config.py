"""Run configs of `vilavt sft` and `vilavt grpo`: TRL's config dataclasses plus what ViLaVT adds, parsed by
TRL's `TrlParser` (a YAML file, then typed command-line overrides), as `trl sft` does.

A run is configured by four dataclasses (`RunConfig`):

* `ViLaVTSFTConfig(SFTConfig)` / `ViLaVTGRPOConfig(GRPOConfig)`: TRL's fields and the ViLaVT ones (data, rounds,
  regions, rewards, zero-advantage skipping);
* `ModelArguments`: which checkpoint and how to load it;
* `TrainableParts`: which parts of the model train (default: the reference's recipe for the stage);
* `LoraArguments`: LoRA / QLoRA adapters instead of full weights.

Keys are flat (`--lora_r 8`, `lora_r: 8`); the nested spellings of earlier run configs (`--lora.r 8`,
`lora: {r: 8}`, `train: {vit: false}`, `reward_weights: {accuracy: 0.5}`) are aliases. An unknown key or a
value of the wrong type is a one-line `ConfigError` that names it.
"""

import difflib
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from trl import GRPOConfig, SFTConfig, TrlParser

from ..rewards import CHOICES as REWARD_CHOICES
from ..rewards import DEFAULTS as REWARD_DEFAULTS

logger = logging.getLogger(__name__)

# Linear layers LoRA adapts by default: attention and MLP projections of the ViT and the LLM (not the
# frozen query encoder).
LORA_TARGETS = r"^(?!.*text_encoder).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv|attn\.proj)$"


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class ConfigError(ValueError):
    """A run config that cannot be used; the message is one line naming the key."""


def _help(text: str, *aliases: str, **extra) -> dict:
    return {"help": text, **({"aliases": list(aliases)} if aliases else {}), **extra}


@dataclass
class ModelArguments:
    """Which checkpoint to train and how to load it."""

    model: str = field(
        default="tiny",
        metadata=_help(
            "Checkpoint folder or hub id, or an offline random-weight preset: tiny[:SEED], tiny-demo[:SEED], "
            "tiny-small[:SEED]. An existing folder always wins over a preset name.",
            "--model_name_or_path",
        ),
    )
    quantization: str | None = field(
        default=None,
        metadata=_help(
            "Load the base weights quantized for QLoRA (needs lora_r): 4bit (nf4) or 8bit (CUDA only).",
            choices=["4bit", "8bit"],
        ),
    )
    attn_implementation: str | None = field(default=None, metadata=_help("sdpa, eager or flash_attention_2."))
    allow_missing_weights: bool = field(
        default=False,
        metadata=_help(
            "Train even if the checkpoint lacks some weights (they start random). Off: such a checkpoint is refused."
        ),
    )


# The trainable parts, and the reference recipe of each stage (REFERENCE.md §4.2, §4.3): SFT trains everything but
# the query text encoder and text_proj; GRPO trains the LLM and text_proj, the vision side frozen.
PARTS = ("llm", "vit", "merger", "instruct", "text_proj", "text_encoder")
SFT_TRAINABLE = dict(llm=True, vit=True, merger=True, instruct=True, text_proj=False, text_encoder=False)
GRPO_TRAINABLE = dict(llm=True, vit=False, merger=False, instruct=False, text_proj=True, text_encoder=False)


def _part(name: str, what: str):
    return field(
        default=None,
        metadata=_help(f"Train {what} (default: the stage's reference recipe, {_recipe(name)}).", f"--train.{name}"),
    )


def _recipe(name: str) -> str:
    return f"SFT {str(SFT_TRAINABLE[name]).lower()}, GRPO {str(GRPO_TRAINABLE[name]).lower()}"


@dataclass
class TrainableParts:
    """Which parts of the model train. Unset parts follow the stage's reference recipe."""

    train_llm: bool | None = _part("llm", "the language model (decoder and LM head)")
    train_vit: bool | None = _part("vit", "the vision transformer blocks")
    train_merger: bool | None = _part("merger", "the vision merger (patch merger into the LLM's width)")
    train_instruct: bool | None = _part("instruct", "the query-aware attention's instruct key/value projections")
    train_text_proj: bool | None = _part("text_proj", "text_proj (query encoder output into the ViT's width)")
    train_text_encoder: bool | None = _part("text_encoder", "the query text encoder")

    def resolve(self, recipe: dict) -> dict:
        """`recipe` with the parts set here replaced."""
        return {
            part: recipe[part] if getattr(self, f"train_{part}") is None else getattr(self, f"train_{part}")
            for part in PARTS
        }


@dataclass
class LoraArguments:
    """peft LoRA adapters instead of full fine-tuning (QLoRA with `quantization`)."""

    lora_r: int | None = field(
        default=None,
        metadata=_help("LoRA rank. Set it to train LoRA adapters instead of the full weights.", "--lora.r"),
    )
    lora_alpha: int = field(
        default=32, metadata=_help("LoRA scaling numerator (alpha / r scales the update).", "--lora.alpha")
    )
    lora_dropout: float = field(default=0.0, metadata=_help("Dropout on the LoRA path.", "--lora.dropout"))
    lora_target_modules: str = field(
        default=LORA_TARGETS,
        metadata=_help(
            "Regex of the module names that get adapters (default: ViT and LLM projections).", "--lora.target_modules"
        ),
    )


@dataclass
class _ViLaVTRun:
    """Fields both stages add to TRL's config."""

    train_file: str | None = field(
        default=None,
        metadata=_help(
            "Training data: a JSONL file of ViLaVT trajectories / question rows, or of TRL-format rows "
            "(SFT: messages + images; GRPO: prompt + image(s) + answer or solution)."
        ),
    )
    image_root: str | None = field(
        default=None,
        metadata=_help("Folder that relative image paths resolve against (default: the train_file's folder)."),
    )
    max_rounds: int = field(default=5, metadata=_help("Tool calls allowed per episode (the round budget)."))
    final_dir: str | None = field(
        default=None, metadata=_help("Where the final remote-code checkpoint is saved (default: OUTPUT_DIR/final).")
    )
    # TRL turns checkpointing on through the deprecated `gradient_checkpointing` name, so transformers warned on
    # every run; the default moves to `activation_checkpointing` (resolved in __post_init__), same behaviour.
    activation_checkpointing: bool | None = field(
        default=None,
        metadata=_help(
            "Recompute activations in the backward pass to save memory (default: on, as TRL).", nargs="?", const=True
        ),
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata=_help("Deprecated alias of activation_checkpointing (transformers).", nargs="?", const=True),
    )

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        # TRL defaults to bf16, which fails where it is not supported (e.g. on CPU): fall back to float32 there.
        supported = bf16_supported()
        if self.bf16 is None:
            self.bf16 = supported and not self.fp16
        elif self.bf16 and not supported:
            logger.warning("bf16 requested but not supported here; training in float32")
            self.bf16 = False
        if self.max_rounds < 0:
            raise ConfigError(f"max_rounds must be >= 0, got {self.max_rounds}")
        if self.ddp_backend is None and not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) >= 0:
            # Processes on CPU: gloo. accelerate picks it under ACCELERATE_USE_CPU, but not for DeepSpeed, whose
            # processes would otherwise each count themselves as the only one.
            self.ddp_backend = "gloo"
        super().__post_init__()


@dataclass
class ViLaVTSFTConfig(_ViLaVTRun, SFTConfig):
    """TRL's `SFTConfig` for ViLaVT trajectories (replayed through the inference code by the project's collator)."""

    output_dir: str | None = field(default="outputs/sft", metadata=_help("Where checkpoints and logs are written."))
    # The collator builds the batches from the raw rows: TRL must neither tokenise, pack nor drop columns.
    remove_unused_columns: bool = field(
        default=False, metadata=_help("Keep the dataset's columns (the collator needs them).")
    )
    dataset_kwargs: dict | str | None = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata=_help("TRL dataset preparation; ViLaVT's collator prepares the rows itself."),
    )
    max_length: int | None = field(
        default=None, metadata=_help("Truncate sequences (None: never; a cut would split images).")
    )


@dataclass
class ViLaVTGRPOConfig(_ViLaVTRun, GRPOConfig):
    """TRL's `GRPOConfig` with ViLaVT rollouts (the multi-round chatting `generate`)."""

    output_dir: str | None = field(default="outputs/grpo", metadata=_help("Where checkpoints and logs are written."))
    disable_dropout: bool = field(
        default=True, metadata=_help("Disable dropout (rollout and scoring see the same model).")
    )
    max_regions: int | None = field(
        default=None, metadata=_help("Regions allowed per tool call (default: the model's generation default).")
    )
    max_turn_tokens: int | None = field(
        default=None, metadata=_help("Tokens one assistant turn may take (default: no cap).")
    )
    skip_zero_advantage: bool = field(
        default=True,
        metadata=_help(
            "Leave completions with advantage 0 out of the loss pass when that leaves the update unchanged "
            "(beta 0, dapo or cispo loss). Decided across processes, so every rank scores the same number of rows."
        ),
    )
    accuracy_weight: float = field(
        default=0.5,
        metadata=_help(
            "Reward: weight of the answer's accuracy (reward = a*acc + f*format if acc > 0).",
            "--reward_weights.accuracy",
        ),
    )
    format_weight: float = field(
        default=0.5, metadata=_help("Reward: weight of the protocol format.", "--reward_weights.format")
    )
    reward_tool_format: str = field(
        default=REWARD_DEFAULTS["tool_format"],
        metadata=_help(
            "Reward: a tool call earns format credit when it would run (executable) or when its JSON has the "
            "authors' shape (authors).", choices=list(REWARD_CHOICES["tool_format"]),
        ),
    )
    reward_answer_tag: str = field(
        default=REWARD_DEFAULTS["answer_tag"],
        metadata=_help(
            "Reward: a turn without <answer> has no answer (required) or is scored as a whole, as the authors do "
            "(optional).", choices=list(REWARD_CHOICES["answer_tag"]),
        ),
    )
    reward_free_text: str = field(
        default=REWARD_DEFAULTS["free_text"],
        metadata=_help(
            "Reward: free-text answers score 1 when equal after normalisation (match) or always 0, as the authors "
            "(zero).", choices=list(REWARD_CHOICES["free_text"]),
        ),
    )

    def reward_options(self) -> dict:
        """The `make_vilavt_reward` keywords (`vilavt.rewards.AUTHORS` gives the authors' reward)."""
        return dict(tool_format=self.reward_tool_format, answer_tag=self.reward_answer_tag,
                    free_text=self.reward_free_text)  # fmt: skip

    def rollout_kwargs(self) -> dict:
        """What the rollouts pass to `generate`."""
        names = ("max_rounds", "max_regions", "max_turn_tokens")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


STAGES = {"sft": ViLaVTSFTConfig, "grpo": ViLaVTGRPOConfig}


@dataclass
class RunConfig:
    """Everything one `vilavt sft` / `vilavt grpo` run is configured with."""

    training: ViLaVTSFTConfig | ViLaVTGRPOConfig
    model: ModelArguments
    parts: TrainableParts
    lora: LoraArguments

    @property
    def stage(self) -> str:
        return "grpo" if isinstance(self.training, GRPOConfig) else "sft"

    def trainable(self) -> dict:
        return self.parts.resolve(GRPO_TRAINABLE if self.stage == "grpo" else SFT_TRAINABLE)


class ViLaVTParser(TrlParser):
    """TrlParser for one stage: no abbreviated options (`--max_step` is a typo, not `--max_steps`), nested YAML
    sections read as their dotted aliases, YAML strings converted by the field's type, and every error one
    `ConfigError` line."""

    def __init__(self, stage: str, overrides: dict | None = None):
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
        self.stage, self.overrides = stage, dict(overrides or {})
        super().__init__(
            (STAGES[stage], ModelArguments, TrainableParts, LoraArguments),
            prog=f"vilavt {stage}",
            usage=f"vilavt {stage} [--config FILE.yaml] [--KEY VALUE ...]",
            description=f"{stage.upper()} from a run config: a YAML file (--config, see examples/configs) whose keys are "
            "the options below; options given on the command line override it.",
            allow_abbrev=False,
        )

    def error(self, message):  # argparse: usage + message + exit; here one line
        raise ConfigError(message)

    def _option(self, key: str):
        return self._option_string_actions.get(f"--{key}")

    def suggest(self, key: str, prefix: str = "--") -> str:
        close = difflib.get_close_matches(f"--{key}", list(self._option_string_actions), n=1)
        return f" (did you mean {prefix}{close[0][2:]}?)" if close else ""

    def resolve(self, config: dict) -> dict:
        """{field name: value} for a mapping in the YAML file's shape (sections, aliases, strings to convert)."""
        flat = {}
        for key, value in config.items():
            section = isinstance(value, dict) and (
                self._option(key) is None or all(self._option(f"{key}.{inner}") for inner in value)
            )
            if section:  # `lora: {r: 8}` -> `lora.r` (also `reward_weights: {accuracy: ..}`, not TRL's list)
                flat.update({f"{key}.{inner}": v for inner, v in value.items()})
            else:
                flat[key] = value
        values, unknown = {}, []
        for key, value in flat.items():
            action = self._option(key)
            if action is None or key == "config":
                unknown.append(key)
                continue
            if isinstance(value, str) and callable(action.type):  # e.g. YAML reads `5e-5` as a string
                try:
                    value = action.type(value)
                except (TypeError, ValueError):
                    raise ConfigError(f"{key}: invalid value {value!r}") from None
            values[action.dest] = value
        if unknown:
            raise ConfigError("; ".join(f"unknown key {key!r}{self.suggest(key, prefix='')}" for key in unknown))
        return values

    def set_defaults_with_config(self, **config) -> list[str]:
        """The file's values, then the caller's `overrides`, become the defaults the command line overrides."""
        super().set_defaults_with_config(**{**self.resolve(config), **self.resolve(self.overrides)})
        return []


def parse_run_config(stage: str, argv: list[str] | None = None, values: dict | None = None) -> RunConfig:
    """A stage's run config from command-line arguments (`--config FILE.yaml` and `--key value` overrides) and/or a
    dict in the YAML file's shape (`values`: applied over the file, under the command line)."""
    parser = ViLaVTParser(stage, values)
    argv = list(argv or [])
    if "--config" in argv:
        position = argv.index("--config") + 1
        if position >= len(argv) or not Path(argv[position]).is_file():
            raise ConfigError(
                f"--config {argv[position] if position < len(argv) else ''}: no such file".replace("  ", " ")
            )
    else:
        parser.set_defaults_with_config()
    try:
        training, model, parts, lora = parser.parse_args_and_config(argv)
    except ConfigError:
        raise
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in the config file: {' '.join(str(err).split())}") from None
    except ValueError as err:  # HfArgumentParser: unknown command-line options; dataclass checks
        message = str(err)
        if "not used by the HfArgumentParser" in message:
            unused = [
                a for a in message.split(": ", 1)[1].strip("[]").replace("'", "").split(", ") if a.startswith("--")
            ]
            raise ConfigError(
                "; ".join(f"unknown option {a}{parser.suggest(a[2:])}" for a in unused) or message
            ) from None
        raise ConfigError(" ".join(message.split())) from None
    if lora.lora_r is None and model.quantization:
        raise ConfigError("quantization loads the base weights for QLoRA: set lora_r too")
    return RunConfig(training, model, parts, lora)


def run_config(stage: str, values: dict | None = None, **overrides) -> RunConfig:
    """A run config from a dict in the YAML file's shape (for Python callers): `run_config("sft", {...}, max_steps=3)`."""
    return parse_run_config(stage, values={**(values or {}), **overrides})


def help_fields(stage: str) -> list[str]:
    """Every option `vilavt STAGE --help` lists (for tests and docs)."""
    names = []
    for dataclass_type in (STAGES[stage], ModelArguments, TrainableParts, LoraArguments):
        names += [f.name for f in fields(dataclass_type) if f.init]
    return names


__all__ = [
    "ConfigError",
    "ModelArguments",
    "TrainableParts",
    "LoraArguments",
    "ViLaVTSFTConfig",
    "ViLaVTGRPOConfig",
    "RunConfig",
    "ViLaVTParser",
    "parse_run_config",
    "run_config",
    "PARTS",
    "SFT_TRAINABLE",
    "GRPO_TRAINABLE",
    "LORA_TARGETS",
]
