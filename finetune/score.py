"""`finetune score`: a trained reward model's scores of responses to a prompt, e.g. to rank samples (best-of-n)
or to check what a run has learned. The prompt and each response are encoded as in training: one user turn and
the assistant's answer with the chat template (as a conversational pair), or, with `raw` or a tokenizer without
a template, the prompt text followed by the response and the eos token (as a pair of strings)."""

from __future__ import annotations

from typing import Any

from finetune.generate import as_chat
from finetune.pairs import encode_pair

UNLIMITED = 1 << 30  # scoring truncates nothing


def response_ids(tokenizer: Any, prompt: str, response: str, raw: bool = False,
                 kwargs: dict[str, Any] | None = None) -> list[int]:
    """The tokens the reward model scores for `response` to `prompt`; `kwargs`: variables for the chat template."""
    if not as_chat(tokenizer, raw):
        row: dict[str, Any] = {"prompt": prompt, "chosen": response, "rejected": response}
    else:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        row = {"chosen": turns, "rejected": turns}
    encoded = encode_pair(row, tokenizer, UNLIMITED, UNLIMITED, "score", kwargs)
    return encoded["prompt"] + encoded["chosen"]


def scores(model: Any, tokenizer: Any, prompt: str, responses: list[str], raw: bool = False,
           kwargs: dict[str, Any] | None = None) -> list[float]:
    """The reward of each response, one forward each (no padding to get wrong), in evaluation mode."""
    import torch

    from finetune.model import in_eval_mode

    out = []
    with in_eval_mode(model), torch.no_grad():
        for response in responses:
            ids = torch.tensor([response_ids(tokenizer, prompt, response, raw, kwargs)], device=model.device)
            out.append(model(input_ids=ids).logits[0, 0].float().item())
    return out
