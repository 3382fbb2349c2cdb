"""Models and tokenizers: local paths, hub ids or builtins; LoRA/QLoRA through peft; gradient checkpointing."""

from __future__ import annotations

import inspect
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from finetune import attention
from finetune.builtin import ensure_builtin_model, is_builtin
from finetune.config import LoraConfig, ModelConfig
from finetune.errors import UserError, count
from finetune.hub import local_only as hub_local_only
from finetune.hub import looks_local
from finetune.losses import IGNORE_INDEX, linear_token_logps, target_positions

logger = logging.getLogger("finetune")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelError(UserError):
    """A model that cannot be loaded for a reason the user must fix (one line, exit code 2)."""


def resolve(name: str) -> str:
    if is_builtin(name):
        try:
            return str(ensure_builtin_model(name))
        except ValueError as e:
            raise ModelError(f"model.name_or_path: {e}") from None
    if looks_local(name) and not os.path.isdir(os.path.expanduser(name)):
        raise ModelError(f"model.name_or_path: no directory {name!r} (a local path, not a hub id; a run saves its "
                         "model to OUTPUT_DIR/model)")
    return name


def _from_pretrained(cls: Any, cfg: ModelConfig, path: str, **kwargs: Any) -> Any:
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):  # e.g. SFT with LoRA, then DPO from it
            merged = os.path.join(os.path.dirname(os.path.normpath(path)) or ".", "merged")
            raise ModelError(f"model.name_or_path: {path} is a LoRA adapter, not a whole model; fold it into its "
                             f"base first (finetune merge {path} {merged}) and point model.name_or_path there")
        raise ModelError(f"model.name_or_path: {path} is a directory without a config.json (expected a model saved "
                         "with save_pretrained)")
    local_only = hub_local_only(path)
    try:
        return cls.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                   local_files_only=local_only, **kwargs)
    except OSError as e:
        if local_only:
            raise ModelError(f"model.name_or_path: {path!r} is not a local directory, is not in the local hub "
                             "cache, and the hub cannot be reached (offline); download it on a connected machine "
                             "or point model.name_or_path at a local copy") from None
        raise ModelError(f"model.name_or_path: cannot load {path!r}: {str(e).splitlines()[0]}") from None


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    path = resolve(cfg.name_or_path)
    try:
        tokenizer = _from_pretrained(AutoTokenizer, cfg, path)
    except ModelError:
        raise
    except ValueError as e:  # e.g. a model directory saved without its tokenizer files
        raise ModelError(f"model.name_or_path: cannot load a tokenizer from {path!r} (are its tokenizer files "
                         f"there?): {str(e).splitlines()[0].rstrip(': ')}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"model.name_or_path: the tokenizer of {cfg.name_or_path!r} has neither a pad nor an "
                             "eos token")
        tokenizer.pad_token = tokenizer.eos_token  # padding positions never reach the loss
    if cfg.chat_template is not None:  # e.g. a base model, which has none; exported with the tokenizer
        tokenizer.chat_template = chat_template_text(cfg.chat_template)
        if cfg.chat_template == "chatml":
            use_chatml_tokens(tokenizer)
    return tokenizer


CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")


def use_chatml_tokens(tokenizer: Any) -> None:
    """For `model.chat_template: chatml`: its turn markers become special tokens where the tokenizer lacks them (a
    base model's), one token each instead of a dozen of text, and `<|im_end|>`, which ends every turn, becomes the
    eos token, so that generation stops where an answer ends (with the text markers, or another eos, a trained
    model wrote on into a next turn). `tokenizer.finetune_new_tokens` holds the added ids (maybe none): the model
    is then given rows for them (`load_model`) and trains them, with LoRA as peft's trainable tokens."""
    vocab = tokenizer.get_vocab()
    missing = [marker for marker in CHATML_MARKERS if marker not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    tokenizer.finetune_new_tokens = tokenizer.convert_tokens_to_ids(missing)
    old_eos = tokenizer.eos_token
    tokenizer.eos_token = CHATML_MARKERS[1]
    if missing or old_eos != tokenizer.eos_token:
        logger.info("model.chat_template chatml: %s%s", f"added {', '.join(missing)} to the tokenizer as special "
                    f"tokens (ids {', '.join(map(str, tokenizer.finetune_new_tokens))}), trained with the model; "
                    if missing else "", f"eos token {tokenizer.eos_token} (was {old_eos})")


def chat_template_text(value: str) -> str:
    """`model.chat_template`: `chatml` (the builtin ChatML template, whose {% generation %} markers locate the
    assistant tokens; `use_chatml_tokens` makes its markers tokens), a Jinja template itself, or the path of a
    file holding one."""
    import os

    from finetune.builtin import CHAT_TEMPLATE

    if value == "chatml":
        return CHAT_TEMPLATE
    if "{{" in value or "{%" in value:
        return value
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    raise ModelError(f"model.chat_template: {value!r} is neither 'chatml', a Jinja template, nor a file")


def attention_for(cfg: ModelConfig, packed: bool) -> str:
    """The attn_implementation to load: packed rows with `sdpa` get `sdpa_varlen` (the same attention, run per
    packed sequence instead of over a block-diagonal mask of the whole row)."""
    name = attention.NAME if packed and cfg.attn_implementation == "sdpa" else cfg.attn_implementation
    if name == attention.NAME:
        attention.register()
    return name


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def without_load_report() -> Iterator[None]:
    """transformers' LOAD REPORT table (a warning) muted, for a load whose missing head is expected."""
    reports = logging.getLogger("transformers.modeling_utils")
    muted = _DropLoadReport()
    reports.addFilter(muted)
    try:
        yield
    finally:
        reports.removeFilter(muted)


def _load_reward_model(cfg: ModelConfig, path: str, **kwargs: Any) -> Any:
    """A checkpoint loaded with a one-output scalar head. From a language model, the head is expected to be new
    and the output layer unused: one info line says so instead of transformers' LOAD REPORT table (a warning);
    weights of the model's body missing, unused or of the wrong shape are still warned about."""
    from transformers import AutoModelForSequenceClassification

    with without_load_report():
        model, info = _from_pretrained(AutoModelForSequenceClassification, cfg, path, num_labels=1,
                                       output_loading_info=True, **kwargs)
    body = model.base_model_prefix + "."
    new_head = sorted(k for k in info["missing_keys"] if not k.startswith(body))
    odd = {"missing (initialised at random)": sorted(k for k in info["missing_keys"] if k.startswith(body)),
           "unused": sorted(k for k in info["unexpected_keys"] if k.startswith(body)),
           "of another shape (initialised at random)": sorted(str(k[0] if isinstance(k, tuple) else k)
                                                              for k in info["mismatched_keys"])}
    if new_head:
        logger.info("reward head %s: new, initialised at random (%s has none)", ", ".join(new_head), path)
    for what, keys in odd.items():
        if keys:
            logger.warning("%s: %s %s: %s", path, count(len(keys), "weight"), what,
                           ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else ""))
    return model


def load_model(cfg: ModelConfig, tokenizer: Any, device: torch.device, kind: str = "causal_lm",
               packed: bool = False) -> Any:
    """`kind` is causal_lm or seq_cls (a one-output scalar head, for reward models); `packed`: the batches will
    be padding-free packed rows."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype], "attn_implementation": attention_for(cfg, packed)}
    if cfg.load_in_4bit or cfg.load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ModelError("model.load_in_4bit: needs bitsandbytes; pip install 'finetune[qlora]'") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit,
            bnb_4bit_quant_type=cfg.bnb_4bit_quant_type, bnb_4bit_compute_dtype=DTYPES[cfg.bnb_4bit_compute_dtype])
        kwargs["device_map"] = {"": device}
    try:
        if kind == "seq_cls":
            model = _load_reward_model(cfg, resolve(cfg.name_or_path), **kwargs)
        else:
            model = _from_pretrained(AutoModelForCausalLM, cfg, resolve(cfg.name_or_path), **kwargs)
    except (ImportError, ValueError) as e:  # e.g. flash_attention_2 without its package, or a misspelt name
        if "attn_implementation" not in str(e) and "Attention" not in str(e):
            raise
        says = str(e).splitlines()[0]
        if "does not support" in says and cfg.attn_implementation != "eager":  # e.g. Gemma 2 (soft-capped logits)
            says = says.split(" Please request")[0] + " Set model.attn_implementation: eager"
        raise ModelError(f"model.attn_implementation: {says}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # training never needs the KV cache; generation asks for it explicitly
    if hasattr(tokenizer, "finetune_new_tokens"):
        fit_to_tokenizer(model, tokenizer)
    return model


def check_added_tokens(tokenizer: Any, lora: bool, distributed_type: str) -> None:
    """Refuse, before the model loads, what cannot train the rows of tokens the tokenizer was given."""
    if getattr(tokenizer, "finetune_new_tokens", None) and lora and distributed_type == "FSDP":
        # measured with FSDP2: fully_shard stops on peft's trainable-token layers ("Invariant encountered")
        raise UserError("model.chat_template: chatml adds its markers to this tokenizer, and LoRA trains their "
                        "rows as peft's trainable tokens, which FSDP cannot shard; train them under DDP, or all "
                        "weights (lora.enabled: false) under FSDP")


def fit_to_tokenizer(model: Any, tokenizer: Any, initialise: bool = True) -> None:
    """Rows for tokens added to the tokenizer (initialised from the others' mean and covariance, as transformers
    does, unless `initialise` is off: an adapter about to write its trained rows over them), and its eos token
    as the model's, which generation stops at (saved with the model), unless the model already stops there
    (Llama 3's generation config lists several)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=initialise)
    for config in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(config, "eos_token_id", None)
        if config is not None and tokenizer.eos_token_id not in (eos if isinstance(eos, list) else [eos]):
            config.eos_token_id = tokenizer.eos_token_id


@contextmanager
def peft_quietly() -> Iterator[None]:
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model; the
    FutureWarning that follows every LoRA run and merge is not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def trainable_tokens(model: Any, new_tokens: list[int], skip: list[str]) -> dict[str, list[int]] | None:
    """peft's `trainable_token_indices` for tokens added to the tokenizer: their rows of the input embeddings,
    and of an output layer of its own (a tied one follows the input's), unless trained in full (`skip`)."""
    if not new_tokens:
        return None
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    layers = [inputs] if outputs is None or outputs.weight is inputs.weight else [inputs, outputs]
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    chosen = {names[id(layer)]: list(new_tokens) for layer in layers if names[id(layer)] not in skip}
    return chosen or None


def tied_embedding_names(model: Any) -> set[str]:
    """The module names (last part: `embed_tokens`, `lm_head`) of the input and output embeddings when they are
    one tied tensor; empty when they are not (or there is no output layer, as on a reward model)."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or getattr(outputs, "weight", None) is not getattr(inputs, "weight", None):
        return set()
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module in (inputs, outputs)}


def names_tied_embedding(model: Any, names: list[str]) -> bool:
    """Whether any of these module names (`lora.modules_to_save`, an adapter's `target_modules`) is one of the
    model's tied input and output embeddings."""
    tied = tied_embedding_names(model)
    return any(name.rsplit(".", 1)[-1] in tied for name in names)


def ties_trained_embeddings(model: Any, cfg: LoraConfig) -> bool:
    """Whether peft must keep the model's tied input and output embeddings tied (`ensure_weight_tying`): they
    share one tensor and `lora.modules_to_save` names one of them. Without it peft trains a copy of the one
    named while the other keeps the original weights (Qwen2.5 and Llama 3.2's small models, Gemma:
    `modules_to_save: [embed_tokens]` trained the input embeddings and left the output layer as it was). Not
    for LoRA adapters on a tied embedding (`target_modules`): peft 0.22 ties those too, but its merge then adds
    their product to the shared tensor twice; untied, they adapt the one named, and `finetune merge` unties the
    saved model (`merge.untie_adapted_embeddings`). peft < 0.18 has no such option and warns instead."""
    from peft import LoraConfig as PeftLoraConfig

    return (names_tied_embedding(model, cfg.modules_to_save)
            and "ensure_weight_tying" in inspect.signature(PeftLoraConfig).parameters)


def apply_lora(model: Any, cfg: LoraConfig, task_type: str, gradient_checkpointing: bool,
               new_tokens: list[int] | None = None) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # peft 0.22 renamed the keyword (and warns on the old one); earlier versions know only the old one
        named = "activation_checkpointing_kwargs" \
            if "activation_checkpointing_kwargs" in inspect.signature(prepare_model_for_kbit_training).parameters \
            else "gradient_checkpointing_kwargs"
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                **{named: {"use_reentrant": False}})
    targets = cfg.target_modules
    extra = {"ensure_weight_tying": True} if ties_trained_embeddings(model, cfg) else {}
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type=task_type,
                              target_modules=targets, modules_to_save=list(cfg.modules_to_save) or None,
                              use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                              trainable_token_indices=trainable_tokens(model, new_tokens or [], cfg.modules_to_save),
                              **extra)
    try:
        with peft_quietly():
            model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ModelError(f"lora.target_modules: {str(e).splitlines()[0]}") from None
    if cfg.fused:
        from finetune.lora_linear import fuse_lora_layers

        fuse_lora_layers(model)
    return model


def enable_gradient_checkpointing(model: Any, lora: bool) -> None:
    # non-reentrant: works with frozen inputs (LoRA) and gives the same gradients as no checkpointing
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if lora:
        model.enable_input_require_grads()


def liger_applier(device: torch.device) -> Callable[[Any], None]:
    """For `model.liger_kernel`: checked before any model loads, a function that puts liger-kernel's Triton
    kernels in place of a model's RMSNorm and SwiGLU MLP, through transformers' own integration (what its
    Trainer's `use_liger_kernel` calls), on that model alone. Liger's fused linear cross-entropy stays off: it
    replaces the model's forward with one that needs the labels; `train.fused_linear_loss` keeps the logits from
    being materialised for every task here instead."""
    if device.type != "cuda":
        raise ModelError(f"model.liger_kernel: its Triton kernels need a CUDA GPU, and this process runs on "
                         f"{device.type}")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
        from transformers.integrations.liger import apply_liger_kernel
    except ImportError:
        raise ModelError("model.liger_kernel: needs the liger-kernel package; pip install 'finetune[liger]'") from None

    def apply(model: Any) -> None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:  # liger would only log this and change nothing
            raise ModelError(f"model.liger_kernel: liger-kernel has no kernels for model type {model_type!r}")
        # Besides patching this model's modules, liger swaps its norm and MLP classes and the rotary function
        # into the modeling module itself: every model built later in the process, on any device, would get
        # them (seen on an H100: a CPU model loaded after a liger run failed in a Triton kernel). Put the
        # module back; this model keeps its patched norms and MLPs. The rotary kernel exists only as that
        # module-level swap, so it stays off.
        modeling = sys.modules[type(model).__module__]
        before = dict(vars(modeling))
        apply_liger_kernel(model, {"fused_linear_cross_entropy": False, "cross_entropy": False, "rope": False})
        for name, value in before.items():
            if vars(modeling).get(name) is not value:
                setattr(modeling, name, value)

    return apply


def build(cfg_model: ModelConfig, cfg_lora: LoraConfig, gradient_checkpointing: bool, device: torch.device,
          tokenizer: Any, kind: str = "causal_lm", packed: bool = False, fused_head: bool = False) -> Any:
    """The trainable model for a task: loaded, LoRA-wrapped if enabled, checkpointed if asked; `fused_head`: its
    output layer can return log p(target) fused with the projection (see `output_head`)."""
    liger = liger_applier(device) if cfg_model.liger_kernel else None  # refused before a large model loads
    model = load_model(cfg_model, tokenizer, device, kind, packed)
    if liger:  # on the transformers model: liger patches its norms and MLPs by their names
        liger(model)
    if fused_head:  # before any wrapping, so FSDP wraps the swapped class
        make_fused_head(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg_lora.enabled)
    if cfg_lora.enabled:
        model = apply_lora(model, cfg_lora, "SEQ_CLS" if kind == "seq_cls" else "CAUSAL_LM", gradient_checkpointing,
                           getattr(tokenizer, "finetune_new_tokens", None))
    return model


@contextmanager
def in_eval_mode(model: Any) -> Iterator[Any]:
    """The model in evaluation mode (no dropout, NEFTune off), and back to the mode it was in afterwards: a model
    just trained, in a notebook, is still in training mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def frozen_weights_dtype(mixed_precision: str, distributed_type: str) -> torch.dtype | None:
    """The dtype to store frozen weights in for `store_frozen_linears_in`: autocast's compute dtype, or None
    (no mixed precision; FSDP and DeepSpeed manage parameter dtypes themselves)."""
    if mixed_precision == "no" or distributed_type in ("FSDP", "DEEPSPEED"):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def store_frozen_linears_in(model: torch.nn.Module, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Keep frozen float32 linear weights (LoRA's base) in the autocast compute dtype; returns those it cast.

    Under autocast every linear layer computes with its weight cast to `dtype`, recast at every forward; a
    frozen weight never changes, so storing it cast once gives bitwise the same results, half its memory, and
    no cast per step (measured: a LoRA micro-batch 5-8% faster on the benchmark model). Weights shared with
    another kind of module (an embedding tied to the output layer) and trainable ones stay float32. Outside
    autocast such a model no longer runs (float32 inputs, half-precision weights): `restore_float32` undoes it."""
    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear)
              for p in m.parameters(recurse=False)}
    cast = []
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        for p in m.parameters(recurse=False):
            if not p.requires_grad and p.dtype == torch.float32 and id(p) not in shared:
                p.data = p.data.to(dtype)
                cast.append(p)
    return cast


def restore_float32(params: list[torch.nn.Parameter]) -> None:
    """Undo `store_frozen_linears_in` (the values stay rounded to the compute dtype they were trained with)."""
    for p in params:
        p.data = p.data.float()


def check_trainable_dtypes(model: torch.nn.Module, mixed_precision: str) -> None:
    """Refuse float16 weights to train under fp16 mixed precision: its loss scaler cannot unscale float16
    gradients and would stop the first step with a traceback (`Attempting to unscale FP16 gradients`), a
    common error when a model is loaded in float16 for full fine-tuning. LoRA adapters are float32 (peft).
    Warn of any other trained 16-bit weights: each update is rounded to their 8 (bfloat16) or 11 (float16) bits,
    so small ones are lost (measured on the tiny model, 20 steps at lr 2e-5 from a held-out loss of 6.00:
    5.90 with bfloat16 weights, 5.63 with float32 weights under train.mixed_precision bf16)."""
    half = [(name, p) for name, p in model.named_parameters()
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)]
    if not half:
        return
    float16 = [name for name, p in half if p.dtype == torch.float16]
    if mixed_precision == "fp16" and float16:
        raise UserError(f"model.dtype: {len(float16)} trainable parameters are float16 (e.g. {float16[0]}), and "
                        "train.mixed_precision fp16's loss scaler cannot unscale float16 gradients; load the weights "
                        "in float32 (model.dtype: float32) or train LoRA adapters (lora.enabled)")
    name, first = half[0]
    dtype = str(first.dtype).removeprefix("torch.")
    logger.warning("model.dtype: %d trainable parameters are %s (e.g. %s): each optimizer update is rounded to "
                   "their precision, so small ones are lost and training stalls at low learning rates; load them "
                   "in float32 (model.dtype: float32) with train.mixed_precision bf16, or train LoRA adapters "
                   "(lora.enabled)", len(half), dtype, name)


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM's forward can compute logits at selected positions only (transformers >= 4.50)."""
    import inspect

    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


def causal_lm_forward(model: Any, batch: dict[str, torch.Tensor], keep_logits: bool) -> torch.Tensor:
    """Logits of a padded or packed batch; only at target positions when the model supports it, so the
    vocabulary projection skips prompt and padding tokens (rows come back as (n_targets, vocab))."""
    kwargs = {"use_cache": False}  # a cache would let packed sequences attend across their boundaries
    if keep_logits:
        kwargs["logits_to_keep"] = target_positions(batch["labels"])
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch.get("position_ids"), **kwargs).logits


class TargetLogpsHead(torch.nn.Linear):
    """A causal LM's output layer that, while `targets` is set, returns log p(target) for each row it is given
    (`losses.linear_token_logps`: the projection fused with the log-softmax, by chunks) instead of logits."""

    targets: torch.Tensor | None = None

    @torch.compiler.disable  # the chunk loop depends on each batch's target count
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:  # generation, or anything else that wants logits
            return super().forward(hidden)
        return linear_token_logps(hidden.reshape(-1, hidden.shape[-1]), self.weight, self.targets)


def unwrap(model: Any) -> Any:
    """The transformers model under any DDP/FSDP/compile and peft wrapping."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def make_fused_head(model: Any) -> None:
    """Turn the model's output layer into a `TargetLogpsHead` (same parameters), or explain why it cannot be."""
    head = model.get_output_embeddings()
    why = None
    if not accepts_logits_to_keep(model):
        why = f"{type(model).__name__}'s forward cannot select positions (no logits_to_keep)"
    elif type(head) is not torch.nn.Linear or head.bias is not None:
        why = f"its output layer is a {type(head).__name__}{' with a bias' if head.bias is not None else ''}, " \
              "not a plain Linear"
    elif getattr(model.config, "final_logit_softcapping", None):
        why = "its logits are soft-capped after the output layer"
    if why:
        raise ModelError(f"train.fused_linear_loss: not available for this model: {why}; set it to false")
    head.__class__ = TargetLogpsHead


def output_head(model: Any) -> TargetLogpsHead:
    """The fused output layer of a model built with `fused_head=True`, under any wrapping."""
    head = unwrap(model).get_output_embeddings()
    if not isinstance(head, TargetLogpsHead):  # e.g. wrapped by peft since lora.target_modules names it
        raise ModelError(f"train.fused_linear_loss: the output layer became a {type(head).__name__} (is it in "
                         "lora.target_modules or lora.modules_to_save, or are tokens added by model.chat_template "
                         "chatml trained in it?); it must stay a plain Linear")
    return head


def target_logps(model: Any, batch: dict[str, torch.Tensor], head: TargetLogpsHead) -> torch.Tensor:
    """(n_targets,) log p(target) of a padded or packed batch's target tokens, in `target_positions` order,
    computed by the fused output layer `head` of `model`: the batch's vocabulary logits never exist at once."""
    targets = batch["labels"][:, 1:]
    head.targets = targets[targets != IGNORE_INDEX]  # the order of the rows logits_to_keep selects
    try:
        return causal_lm_forward(model, batch, keep_logits=True)  # make_fused_head checked logits_to_keep
    finally:
        head.targets = None
