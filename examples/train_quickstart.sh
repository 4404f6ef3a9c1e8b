#!/usr/bin/env bash
# The training quickstart of the README, from a fresh clone, on CPU (tests/test_training_configs.py runs these
# lines with smaller sizes): synthetic data, SFT of the tiny demo model, then GRPO from the SFT checkpoint.
set -euo pipefail
vilavt synth-data --out outputs/synth --n 200
vilavt sft --config examples/configs/sft_tiny.yaml --max_steps 100
vilavt grpo --config examples/configs/grpo_tiny.yaml --learning_rate 5e-5 --max_steps 20
