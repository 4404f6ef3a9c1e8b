"""What the chatting loop does to each row's logits inside vLLM, in the transformers loop's order:

1. record the policy's log-prob of the token about to be sampled, log-softmax(logits / temperature) of the
   raw logits (what `ChatSession` records with `output_logprobs`, and what GRPO's scoring pass computes);
2. the conversation's transformers-style logits processors (`processor(input_ids, scores)`, e.g.
   `vilavt.scripted.ScriptedPolicy` or `NoBadWordsLogitsProcessor`), with the conversation so far as input ids;
3. the ban of control tokens (`control_token_ids`), after every processor.

vLLM builds its logits processors from classes it loads at start-up; `ViLaVTLogitsProcessor` is installed as
the `vllm.logits_processors` entry point of the vilavt package, so every engine has it — also the one TRL's
GRPO trainer builds. A request opts in through `SamplingParams.extra_args[KEY]`; other requests are untouched.
The ban and the temperature travel in the request; the processors and the record of log-probs live in this
process's registry, so requests naming them need the engine core in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, which `vilavt.vllm.api.load_engine` sets and TRL's colocate mode implies).
"""

import itertools

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

KEY = "vilavt"
_registry: dict[str, object] = {}
_ids = itertools.count()


class LogprobRecord:
    """The policy's log-probs of one request's sampled tokens. vLLM calls the processor before it samples, so the
    log-softmax row of a step is kept until the next call (or the request's end) says which token was sampled;
    the picked values stay on the device until `values` (no host sync per token)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.picked: list[torch.Tensor] = []
        self.row: torch.Tensor | None = None
        self.row_at = -1  # how many tokens the request had sampled when `row` was computed

    def see(self, output_ids: list[int], logits: torch.Tensor) -> None:
        if self.row is not None and len(output_ids) == self.row_at + 1:
            self.picked.append(self.row[output_ids[-1]])
        # (A call without a new token — a chunk of a prompt — replaces the row.)
        self.row = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        self.row_at = len(output_ids)

    def values(self, tokens: list[int]) -> list[float]:
        """The log-probs of `tokens`: every token the finished request sampled, in order."""
        picked = list(self.picked)
        if self.row is not None and len(tokens) == self.row_at + 1:
            picked.append(self.row[tokens[-1]])
        if len(picked) != len(tokens):
            raise RuntimeError(f"recorded {len(picked)} log-probs for {len(tokens)} sampled tokens")
        return torch.stack(picked).tolist() if picked else []


def register(value) -> str:
    """Make `value` (logits processors, or a `LogprobRecord`) reachable from requests; returns its key."""
    key = f"{next(_ids)}"
    _registry[key] = value
    return key


def unregister(key: str | None) -> None:
    _registry.pop(key, None)


def lookup(key: str):
    value = _registry.get(key)
    if value is None:
        raise RuntimeError(
            f"vilavt logits state {key!r} is not registered in the engine's process: per-conversation logits "
            "processors and log-prob records need the engine core in the caller's process "
            "(VLLM_ENABLE_V1_MULTIPROCESSING=0)"
        )
    return value


def request_args(banned: list[int], processors: str | None = None, record: str | None = None,
                 temperature: float = 1.0) -> dict:
    """`SamplingParams.extra_args` of a loop request: banned token ids, and the registry keys of its logits
    processors and of its log-prob record."""
    return {KEY: {"banned": list(banned), "processors": processors, "record": record, "temperature": temperature}}


class ViLaVTLogitsProcessor(AdapterLogitsProcessor):
    """vLLM adapter running steps 1–3 of the module docstring on the rows of requests that carry `extra_args[KEY]`."""

    def is_argmax_invariant(self) -> bool:
        return False  # it bans tokens and runs processors that may force tokens: greedy decoding needs it too

    def new_req_logits_processor(self, params):
        spec = (params.extra_args or {}).get(KEY)
        if spec is None:
            return None
        processors = lookup(spec["processors"]) if spec.get("processors") else None
        record = lookup(spec["record"]) if spec.get("record") else None
        banned = torch.tensor(spec.get("banned") or [], dtype=torch.long)

        def apply(prompt_ids, output_ids, logits):
            if record is not None:
                record.see(output_ids, logits)
            if processors is not None:
                ids = torch.tensor([[*prompt_ids, *output_ids]], dtype=torch.long, device=logits.device)
                logits = processors(ids, logits.unsqueeze(0).clone())[0]
            if len(banned):
                logits = logits.index_fill(0, banned.to(logits.device), float("-inf"))
            return logits

        return apply


__all__ = ["ViLaVTLogitsProcessor", "LogprobRecord", "register", "unregister", "request_args", "KEY"]
