"""GRPO with vLLM rollouts: `ViLaVTGRPOTrainer(use_vllm=True)` in TRL's colocate mode, two steps on the tiny model.
Runs only in the vLLM environment (`python -m pytest --vllm tests/test_vllm_grpo.py`); each run is a fresh
interpreter (tests/vllm_grpo_job.py), so TRL's engine is its process's only vLLM engine."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

JOB = Path(__file__).parent / "vllm_grpo_job.py"


def run_job(folder: Path, *flags: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "VLLM_CACHE_ROOT": str(folder / "vllm-cache")}
    result = subprocess.run(
        [sys.executable, str(JOB), str(folder), *flags], capture_output=True, text=True, timeout=900, env=env
    )
    assert result.returncode == 0, f"GRPO job failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("grpo-vllm")), run_job(tmp_path_factory.mktemp("grpo-vllm-stale"), "--no-sync")


def test_two_grpo_steps_roll_out_on_trls_vllm_engine(runs):
    synced, _ = runs
    assert synced["steps"] == 2
    assert synced["rounds_per_episode"] == [1.0, 1.0]  # each rollout called the tool once, then answered
    assert all(std > 0 for std in synced["reward_std"])  # a right and a wrong answer in each group
    # Every rollout ran on the engine: one vLLM request per assistant turn.
    assert synced["vllm_requests_per_episode"] == [2, 2, 2, 2]
    assert synced["tool_tokens_masked"]
    assert synced["policy_moved"] > 1e-3


def test_trl_syncs_the_policy_into_the_engine(runs):
    """After each of TRL's syncs the engine holds the policy's weights (in its dtype), and the rollouts' log-probs
    match the trainer's scoring pass at both steps — which they do not when the engine keeps the first weights."""
    synced, stale = runs
    assert synced["syncs_matched_policy"] == [True, True]
    # The engine runs in bfloat16 (vLLM's "auto" dtype for a float32 checkpoint), the trainer in float32.
    assert max(synced["logprob_gap"]) < 0.02, synced["logprob_gap"]
    assert stale["syncs_matched_policy"] == [True, False]
    assert stale["logprob_gap"][1] > 10 * max(synced["logprob_gap"]), (stale["logprob_gap"], synced["logprob_gap"])


def test_server_mode_is_one_clear_error():
    from vilavt.vllm import VLLMBackendError
    from vilavt.vllm.rollouts import check_vllm_args

    with pytest.raises(VLLMBackendError, match="need vllm_mode='colocate'"):
        check_vllm_args(types.SimpleNamespace(vllm_mode="server"))
