"""Stage 1: supervised fine-tuning on multi-turn trajectories with TRL's SFTTrainer.

The trajectories are replayed through the same protocol, cropping and chat template as inference
(`vilavt.trajectories`); the loss covers the assistant turns only.
"""

import logging

from ..trajectories import TrajectoryCollator, as_dataset, load_trajectories
from .common import (
    SFT_TRAINABLE,
    apply_lora,
    load_model_and_processor,
    precision_defaults,
    save_checkpoint,
    set_trainable,
    split_config,
)

logger = logging.getLogger(__name__)


def build_sft_trainer(config: dict, model=None, processor=None):
    """An SFTTrainer for a run config (see examples/configs/sft_*.yaml). `model` / `processor` may be given
    instead of `config["model"]`."""
    from trl import SFTConfig, SFTTrainer

    ours, trl_kwargs = split_config(config)
    if model is None:
        model, processor = load_model_and_processor(ours.get("model", "tiny"), ours.get("quantization"))
    counts = set_trainable(model, {**SFT_TRAINABLE, **ours.get("train", {})})
    logger.info("trainable parameters per part: %s", counts)
    if ours.get("lora"):
        model = apply_lora(model, ours["lora"])
    rows = load_trajectories(ours["train_file"])
    trl_kwargs = precision_defaults(dict(trl_kwargs))
    trl_kwargs.setdefault("output_dir", "outputs/sft")
    args = SFTConfig(
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        packing=False,
        max_length=None,
        **trl_kwargs,
    )
    collator = TrajectoryCollator(
        processor, model.config, image_root=ours.get("image_root"), max_rounds=ours.get("max_rounds", 5)
    )
    return SFTTrainer(
        model=model, args=args, train_dataset=as_dataset(rows), data_collator=collator, processing_class=processor
    )


def run_sft(config: dict) -> str:
    """Train and save a remote-code checkpoint (LoRA merged) to `final_dir` (default: output_dir/final)."""
    trainer = build_sft_trainer(config)
    trainer.train()
    final = config.get("final_dir") or f"{trainer.args.output_dir}/final"
    return save_checkpoint(trainer.model, trainer.processing_class, final)
