"""Transformers-style logits processors (`processor(input_ids, scores)`, e.g. `vilavt.scripted.ScriptedPolicy`
or `NoBadWordsLogitsProcessor`) applied to one conversation's requests inside vLLM.

vLLM builds its logits processors itself from a class given to `LLM(logits_processors=[...])`; a request
names its conversation's processors through `SamplingParams.extra_args[KEY]`, looked up in this
process's registry. The engine core must therefore run in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, what `vilavt.vllm.api.load_engine` sets); otherwise a request that
names processors fails with a message saying so.
"""

import itertools

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

KEY = "vilavt_logits_processor"
_registry: dict[str, object] = {}
_ids = itertools.count()


def register(processors) -> str:
    """Make `processors` callable from requests; returns the key to put in `extra_args[KEY]`."""
    key = f"lp-{next(_ids)}"
    _registry[key] = processors
    return key


def unregister(key: str) -> None:
    _registry.pop(key, None)


class TransformersLogitsProcessors(AdapterLogitsProcessor):
    """vLLM adapter: calls the registered processors with the conversation so far (prompt + sampled ids)
    as a batch of one, as the transformers loop does."""

    def is_argmax_invariant(self) -> bool:
        return False  # they may force or ban tokens, so greedy decoding needs them too

    def new_req_logits_processor(self, params):
        key = (params.extra_args or {}).get(KEY)
        if key is None:
            return None
        processors = _registry.get(key)
        if processors is None:
            raise RuntimeError(
                f"logits processors {key!r} are not registered in the engine's process: per-conversation logits "
                "processors need the engine core in the caller's process (VLLM_ENABLE_V1_MULTIPROCESSING=0)"
            )

        def apply(prompt_ids, output_ids, logits):
            ids = torch.tensor([[*prompt_ids, *output_ids]], dtype=torch.long)
            return processors(ids, logits.unsqueeze(0).clone())[0]

        return apply


__all__ = ["TransformersLogitsProcessors", "register", "unregister", "KEY"]
