"""A scripted policy: a logits processor that makes a (random or trained) model follow given turns.

Used to force tool calls in tests and benchmarks: each assistant turn of each row may start with
`free` tokens the model chooses itself (stop tokens banned), followed by forced text.
"""

import torch
from transformers import LogitsProcessor

from .remote_code.protocol_vilavt import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CLOSE,
    TOOL_OPEN,
    render_answer,
    render_tool_call,
)


def tool_call_text(regions: list[tuple[int, list[int]]], query: str, thought: str = "zoom") -> str:
    return render_tool_call(regions, query, thought)


def answer_text(answer: str, thought: str = "done") -> str:
    return render_answer(answer, thought)


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
            # Scripts are text the model writes: a special-token string in them is spelled out, not the token.
            [(free, tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)) for free, text in row]
            for row in self.scripts
        ]
        banned = {self.eos}
        for tag in (THINK_OPEN, THINK_CLOSE, TOOL_OPEN, TOOL_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, "<|im_start|>"):
            ids = tokenizer.encode(tag, add_special_tokens=False)
            if len(ids) == 1:
                banned.add(ids[0])
        self.banned = sorted(banned)
        self.pad = tokenizer.pad_token_id
        self.rows: dict[int, dict] = {}  # per row: length seen, assistant-turn starts, turns in the prompt

    def _update(self, row: int, ids: torch.Tensor) -> dict:
        """Find new assistant-turn starts in the tokens appended since the last call (left padding
        stripped), so each step costs O(new tokens)."""
        state = self.rows.setdefault(row, {"seen": 0, "starts": [], "prompt_turns": None})
        first = int(ids.ne(self.pad).int().argmax())  # left padding ends here
        length, n = len(ids) - first, len(self.marker)
        begin = max(0, state["seen"] - n + 1)
        new = ids[first + begin :].tolist()
        for i in range(len(new) - n + 1):
            if new[i : i + n] == self.marker:
                state["starts"].append(begin + i + n)
        state["seen"] = length
        if state["prompt_turns"] is None:
            state["prompt_turns"] = len(state["starts"])
        return state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for row in range(min(len(self.scripts), scores.shape[0])):
            state = self._update(row, input_ids[row])
            if not state["starts"]:
                continue
            turn = len(state["starts"]) - state["prompt_turns"]
            generated = state["seen"] - state["starts"][-1]
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
