"""`finetune generate`: answer prompts with a trained model, to see what a run has learned.

The model is an exported directory (`OUTPUT_DIR/model`): a full model, or a LoRA adapter that is folded into
its base for the purpose. Prompts are rendered as one user turn with the tokenizer's chat template when it has
one (as in training on chat rows), else passed as plain text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from finetune.errors import UserError


def load(model_dir: str | Path, dtype: str = "auto", reward: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of an exported model or LoRA adapter directory, on the GPU when there is one: a causal
    LM, or with `reward` a reward model (one score per sequence). `dtype` auto: bfloat16 on a GPU, float32 on a
    CPU."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from finetune.merge import load_merged

    transformers.utils.logging.disable_progress_bar()  # a bar for loading a few files would only clutter answers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such directory (expected a trained model, e.g. OUTPUT_DIR/model)")
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        is_reward, what = json.loads(adapter.read_text()).get("task_type") == "SEQ_CLS", " adapter"
    elif (path / "config.json").is_file():
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
        is_reward, what = any(a.endswith("ForSequenceClassification") for a in architectures), ""
    else:
        raise UserError(f"{path}: not a model directory (no config.json or adapter_config.json)")
    if is_reward and not reward:
        raise UserError(f"{path}: a reward model{what}; it scores text and does not generate (finetune score)")
    if reward and not is_reward:
        raise UserError(f"{path}: a language model{what}, not a reward model; it generates and does not score "
                        "(train one with finetune rm)")
    if adapter.is_file():
        model, tokenizer = load_merged(path, dtype=dtype)
    else:
        cls, kwargs = (AutoModelForSequenceClassification, {"num_labels": 1}) if reward else (AutoModelForCausalLM, {})
        model = cls.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def as_chat(tokenizer: Any, raw: bool) -> bool:
    """Whether a prompt from the command line is a user turn of the chat template: unless `raw`, or the tokenizer
    has no template (`generate` and `score` alike)."""
    return not raw and getattr(tokenizer, "chat_template", None) is not None


def saved_template_kwargs(model_dir: str | Path) -> dict[str, Any]:
    """The chat template variables a run trained with (data.chat_template_kwargs), saved beside its model."""
    from finetune.checkpoint import TEMPLATE_KWARGS

    path = Path(model_dir) / TEMPLATE_KWARGS
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable as JSON ({e}); expected the template variables of its run") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: expected a mapping of template variables, got {type(saved).__name__}")
    return saved


def template_kwargs(tokenizer: Any, kwargs: dict[str, Any] | None, raw: bool, what: str) -> dict[str, Any]:
    """Checked variables for the chat template (as data.chat_template_kwargs in training), named `what` in
    errors; refused where no template renders the prompt."""
    from finetune.chat import check_template_kwargs

    if kwargs and not as_chat(tokenizer, raw):
        raise UserError(f"{what}: no chat template renders the prompt here (--raw, or the model has none)")
    check_template_kwargs(tokenizer, kwargs, f"{what} ")
    return dict(kwargs or {})


def prompt_ids(tokenizer: Any, prompt: str, raw: bool = False, kwargs: dict[str, Any] | None = None) -> list[int]:
    """The prompt as one user turn of the chat template (ending where the assistant's answer starts), rendered with
    the template variables `kwargs`, or its plain tokens when the tokenizer has no template or `raw`."""
    if not as_chat(tokenizer, raw):
        return list(tokenizer(prompt)["input_ids"])
    from finetune.chat import apply_template

    return list(apply_template(tokenizer, [{"role": "user", "content": prompt}], "prompt", tokenize=True,
                               add_generation_prompt=True, return_dict=True, **(kwargs or {}))["input_ids"])


def answers(model: Any, tokenizer: Any, prompts: Iterable[str], max_new_tokens: int = 64,
            temperature: float = 0.0, raw: bool = False, seed: int = 0,
            kwargs: dict[str, Any] | None = None) -> Iterator[str]:
    """Each prompt's completion (greedy at temperature 0, else sampled), one prompt at a time, in order; `kwargs`:
    variables for the chat template, as data.chat_template_kwargs in training."""
    import torch

    from finetune.model import in_eval_mode

    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with in_eval_mode(model):
        for prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt, raw, kwargs)], device=model.device)
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **sampling)
            yield tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
