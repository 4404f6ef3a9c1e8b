"""Stage 1: supervised fine-tuning with TRL's SFTTrainer, on ViLaVT trajectories or TRL conversational rows.

Trajectories are replayed through the same protocol, cropping and chat template as inference
(`vilavt.trajectories`); the loss covers the assistant turns only.
"""

import logging

from trl import SFTTrainer

from ..trajectories import TrajectoryCollator
from .common import prepare_model, run_and_dataset, save_final
from .config import RunConfig

logger = logging.getLogger(__name__)


class ViLaVTSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is the token mean over the whole batch: every process's and accumulation step's tokens.

    Qwen2.5-VL's class says its forward takes no loss kwargs (`accepts_loss_kwargs = False`), so `Trainer` would
    leave `num_items_in_batch` unset and each process would divide by its own token count (DDP then averages unequal
    means: the update would depend on how the batch is split across processes). TRL's SFT loss never passes loss
    kwargs to the model (it computes the loss from the model's log-probs), so counting the batch's tokens is safe.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True


def build_sft_trainer(config: RunConfig | dict, model=None, processor=None, train_dataset=None) -> SFTTrainer:
    """An SFTTrainer for a run config (`vilavt.train.config`; a dict in the YAML files' shape also works, see
    examples/configs/sft_*.yaml). `model` / `processor` may be given instead of `config.model`; `train_dataset`
    (rows of `vilavt.train.data.sft_dataset`) instead of `train_file`."""
    config, train_dataset = run_and_dataset("sft", config, train_dataset)
    args = config.training
    model, processor = prepare_model(config, model, processor)
    collator = TrajectoryCollator(processor, model.config, image_root=args.image_root, max_rounds=args.max_rounds)
    return ViLaVTSFTTrainer(
        model=model, args=args, train_dataset=train_dataset, data_collator=collator, processing_class=processor
    )


def run_sft(config: RunConfig | dict) -> str:
    """Train and save a remote-code checkpoint (LoRA merged) to `final_dir` (default: output_dir/final)."""
    trainer = build_sft_trainer(config)
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    return save_final(trainer)
