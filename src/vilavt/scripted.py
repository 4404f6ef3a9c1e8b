"""A scripted policy: a logits processor that makes a (random or trained) model follow given turns.

Used to force tool calls in tests and benchmarks: each assistant turn of each row may start with
`free` tokens the model chooses itself (stop tokens banned), followed by forced text.
"""

import torch
from transformers import LogitsProcessor

from .remote_code.protocol_vilavt import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, TOOL_CLOSE, TOOL_OPEN


def tool_call_text(regions: list[tuple[int, list[int]]], query: str, thought: str = "zoom") -> str:
    import json

    payload = {"region": [{"index": i, "bbox_2d": list(box)} for i, box in regions], "query": query}
    return f"{THINK_OPEN}{thought}{THINK_CLOSE}{TOOL_OPEN}{json.dumps(payload)}{TOOL_CLOSE}"


def answer_text(answer: str, thought: str = "done") -> str:
    return f"{THINK_OPEN}{thought}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


class ScriptedPolicy(LogitsProcessor):
    """Force each row's assistant turns to follow `scripts[row]`.

    A turn is a string (forced) or `(free, text)`: `free` tokens picked by the model (end-of-turn and
    protocol tag tokens banned), then `text` forced. When a row's script runs out, end-of-turn is forced.
    Rows are identified by their position in the batch, turns by counting `<|im_start|>assistant\\n`.
    """

    def __init__(self, tokenizer, scripts: list[list], eos_token: str = "<|im_end|>"):
        self.marker = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.eos = tokenizer.convert_tokens_to_ids(eos_token)
        self.scripts = [
            [(0, turn) if isinstance(turn, str) else turn for turn in row] for row in scripts
        ]
        self.scripts = [
            [(free, tokenizer.encode(text, add_special_tokens=False)) for free, text in row] for row in self.scripts
        ]
        banned = {self.eos}
        for tag in (THINK_OPEN, THINK_CLOSE, TOOL_OPEN, TOOL_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, "<|im_start|>"):
            ids = tokenizer.encode(tag, add_special_tokens=False)
            if len(ids) == 1:
                banned.add(ids[0])
        self.banned = sorted(banned)
        self.initial_turns: dict[int, int] = {}

    def _turn_starts(self, ids: list[int]) -> list[int]:
        n = len(self.marker)
        return [i + n for i in range(len(ids) - n + 1) if ids[i : i + n] == self.marker]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for row in range(min(len(self.scripts), scores.shape[0])):
            ids = input_ids[row].tolist()
            starts = self._turn_starts(ids)
            if not starts:
                continue
            first = self.initial_turns.setdefault(row, len(starts))
            turn = len(starts) - first
            generated = len(ids) - starts[-1]
            script = self.scripts[row]
            if turn >= len(script):
                forced = self.eos
            else:
                free, text = script[turn]
                if generated < free:
                    scores[row, self.banned] = float("-inf")
                    continue
                j = generated - free
                forced = text[j] if j < len(text) else self.eos
            keep = scores[row, forced].clone()
            scores[row] = float("-inf")
            scores[row, forced] = keep if torch.isfinite(keep) else 0.0
        return scores
