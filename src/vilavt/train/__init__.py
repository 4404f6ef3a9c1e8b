"""Two-stage training with TRL: SFT on trajectories (`sft`), then GRPO with ViLaVT rollouts (`grpo`)."""
