"""`finetune merge`: fold a LoRA adapter into its base model and save a plain `from_pretrained` model."""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from finetune.checkpoint import TEMPLATE_KWARGS
from finetune.errors import UserError
from finetune.hub import local_only

logger = logging.getLogger("finetune")


def check_output(adapter_dir: Path, output_dir: Path, overwrite: bool) -> None:
    """The merged model replaces `output_dir` as a whole: refuse what that would wrongly delete."""
    out = output_dir.resolve()
    for inside, what in ((adapter_dir.resolve(), "the adapter"), (Path.cwd().resolve(), "the current directory")):
        if out == inside or out in inside.parents:
            raise UserError(f"{output_dir}: the merged model would replace it, and it holds {what}; choose a new "
                            "directory")
    if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite):
        raise UserError(f"{output_dir}: already exists and is not empty; choose a new directory, or pass "
                        "--overwrite to replace it")


def load_merged(adapter_dir: Path, base: str | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """(the base named in the adapter's config, or `base`, with the adapter folded in; the adapter's tokenizer).
    Reward-model adapters give a sequence-classification model with its trained head."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from finetune.model import fit_to_tokenizer, peft_quietly, without_load_report

    config_file = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: no such directory (expected a LoRA adapter, e.g. OUTPUT_DIR/model)")
    if not config_file.is_file():
        raise UserError(f"{adapter_dir}: not a LoRA adapter directory (no adapter_config.json)")
    config = json.loads(config_file.read_text())
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{config_file}: names no base model; pass --base")
    seq_cls = config.get("task_type") == "SEQ_CLS"
    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    kwargs = {"num_labels": 1} if seq_cls else {}
    try:
        with without_load_report() if seq_cls else nullcontext():  # the adapter holds the reward head
            model = cls.from_pretrained(base, dtype=getattr(torch, dtype), local_files_only=local_only(base),
                                        **kwargs)
    except OSError as e:
        raise UserError(f"{adapter_dir}: cannot load its base model {base!r} (merge takes --base PATH): "
                        f"{str(e).splitlines()[0]}") from None
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    # rows for tokens the run added (model.chat_template: chatml), which the adapter's trained rows replace
    fit_to_tokenizer(model, tokenizer, initialise=False)
    untie_adapted_embeddings(model, config)
    with peft_quietly():
        return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload(), tokenizer


def untie_adapted_embeddings(model: Any, config: dict[str, Any]) -> None:
    """Give the output layer its own copy of tied embeddings when the adapter has LoRA on one of them (its
    `target_modules`, without peft's weight tying): the run adapted that one only, and merging into the shared
    tensor would change the other too. The merged model is then saved untied, each layer as the run had it."""
    import torch

    from finetune.model import names_tied_embedding

    targets = config.get("target_modules") or []
    if config.get("ensure_weight_tying") or isinstance(targets, str) or not names_tied_embedding(model, targets):
        return  # tied by peft, a pattern (all-linear), which leaves embeddings out, or not on a tied embedding
    inputs = model.get_input_embeddings()
    model.get_output_embeddings().weight = torch.nn.Parameter(inputs.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, base: str | None = None,
                  dtype: str = "float32", overwrite: bool = False) -> Path:
    """Load the base named in the adapter's config (or `base`), merge the adapter into it, save to `output_dir`
    (which must be new or empty unless `overwrite`, and never one that holds the adapter)."""
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    check_output(adapter_dir, output_dir, overwrite)
    merged, tokenizer = load_merged(adapter_dir, base, dtype)
    tmp = output_dir.parent / f".tmp-{output_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if (adapter_dir / TEMPLATE_KWARGS).is_file():  # the run's template variables go with its tokenizer
        shutil.copy(adapter_dir / TEMPLATE_KWARGS, tmp / TEMPLATE_KWARGS)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    logger.info("merged %s into %s and saved %s", adapter_dir, merged.name_or_path, output_dir)
    return output_dir
