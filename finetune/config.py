"""Typed recipe configuration: YAML -> frozen dataclasses, validated at load.

Every user mistake becomes a `ConfigError` whose message names the file, the dotted key and what was expected;
the CLI prints it on one line and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import UserError
from finetune.schedule import SHAPES

TASKS = ("sft", "rm", "dpo")
# dpo.loss_type's values (`finetune.losses.dpo_loss`'s, and kto: `kto_loss`), named here, where recipes are checked
# without importing torch
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "bco_pair", "nca_pair", "exo_pair", "sppo_hard", "apo_zero",
                  "apo_down", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")  # the loss types that use no reference model
ALONE = (*REFERENCE_FREE, "kto")  # loss types that cannot be listed with others (kto: its rows are not pairs)
# attention implementations for which a packed row gives exactly the padded batch's loss and gradients (tested)
PACKING_ATTENTION = ("eager", "sdpa", "sdpa_varlen", "flash_attention_2", "flash_attention_3")
# what finetune.optimizer.build_optimizer builds
OPTIMIZERS = ("adamw", "adamw_8bit", "lion", "lion_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "paged_lion_8bit")


class ConfigError(UserError):
    """A recipe or override the user must fix (printed as one line, exit code 2)."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "builtin:tiny-llama"
    revision: str | None = None
    dtype: str = "float32"  # weights dtype: float32 | bfloat16 | float16 | auto
    attn_implementation: str = "sdpa"  # eager | sdpa | sdpa_varlen | flash_attention_2 | ...
    liger_kernel: bool = False  # CUDA: liger-kernel's Triton RMSNorm, SwiGLU and RoPE in place of the model's
    trust_remote_code: bool = False  # never on unless a recipe asks for it
    chat_template: str | None = None  # chatml | a Jinja file | a Jinja string, instead of the tokenizer's own
    load_in_4bit: bool = False  # QLoRA: NF4 weights through bitsandbytes
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))
        _choice("model.bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        _choice("model.bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, ("float32", "bfloat16", "float16"))
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("model.load_in_4bit and model.load_in_8bit: expected at most one of them to be true")


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)  # whole modules also trained (e.g. [norm])
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA)
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output feature as well
    fused: bool = True  # plain LoRA linear layers run finetune's one-node forward (same results); false: peft's

    def __post_init__(self) -> None:
        _range("lora.r", self.r, lo=1)
        _range("lora.alpha", self.alpha, lo=0, lo_open=True)
        _range("lora.dropout", self.dropout, lo=0, hi=1, hi_open=True)
        targets = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        if not targets or not all(t.strip() for t in targets):
            raise ConfigError(f"lora.target_modules: expected all-linear or a list of module names (q_proj, ...), "
                              f"got {self.target_modules!r}")


@dataclass(frozen=True)
class DataConfig:
    # JSONL/JSON/Parquet/CSV/TSV path, builtin:NAME, hub dataset; or a list of them, or a mapping of them to fractions
    train: str | list[str] | dict[str, float] = "builtin:tasks"
    eval: str | list[str] | None = None  # same forms; when absent, eval_fraction of each train source is held out
    eval_fraction: float = 0.0
    split: str = "train"  # hub split for `train`
    eval_split: str = "test"  # hub split for `eval` when it names a hub dataset
    format: str = "auto"  # auto | chat | sharegpt | prompt_completion | alpaca | text
    columns: dict[str, str] = field(default_factory=dict)  # a source's column -> the name read ({question: prompt})
    # extra variables for the chat template ({enable_thinking: false}); a row's own `chat_template_kwargs` win
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_length: int = 1024
    max_prompt_length: int = 0  # preference pairs: prompt tokens kept (from the end); 0 means max_length // 2
    completion_only_loss: bool = True  # loss on assistant / completion tokens only
    packing: bool = False  # padding-free micro-batches: sequences (or pairs) concatenated, positions restart
    num_workers: int = 0
    num_proc: int = 0  # processes that tokenize (0: one per available CPU, at most 8)
    cache_tokenized: bool = True  # keep tokenized rows under FINETUNE_HOME/tokenized for the next run

    def __post_init__(self) -> None:
        _choice("data.format", self.format, ("auto", "chat", "sharegpt", "prompt_completion", "alpaca", "text"))
        for key in ("train", "eval"):
            value = getattr(self, key)
            if value in ([], {}, "") or (isinstance(value, (list, dict)) and "" in value):
                raise ConfigError(f"data.{key}: expected a data source or a non-empty list of them, got {value!r}")
        for source, share in (self.train.items() if isinstance(self.train, dict) else ()):
            _range(f"data.train.{source}", share, lo=0, lo_open=True)
        targets = list(self.columns.values())
        if "" in targets or "" in self.columns:
            raise ConfigError(f"data.columns: expected non-empty column names, got {self.columns!r}")
        if len(set(targets)) < len(targets):
            twice = sorted({t for t in targets if targets.count(t) > 1})
            raise ConfigError(f"data.columns: two columns renamed to the same name {twice[0]!r}")
        _range("data.eval_fraction", self.eval_fraction, lo=0, hi=0.9)
        _range("data.max_length", self.max_length, lo=8)
        _range("data.max_prompt_length", self.max_prompt_length, lo=0, hi=self.max_length - 1)
        _range("data.num_workers", self.num_workers, lo=0)
        _range("data.num_proc", self.num_proc, lo=0)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 0  # optimizer steps; 0 means "use epochs"
    epochs: float = 1.0
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    batch_tokens: int = 0  # with data.packing: micro-batches of whole rows up to this many tokens (0: batch_size rows)
    lr: float = 2e-5
    lr_schedule: str = "cosine"  # cosine | linear | constant, after the warmup
    min_lr_ratio: float = 0.1  # cosine and linear decay to lr * min_lr_ratio
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # warmup as a fraction of the run's optimizer steps (rounded up), instead of steps
    weight_decay: float = 0.0  # never applied to biases and norms
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    optimizer: str = "adamw"  # adamw (torch's, fused) | adamw_8bit | lion | lion_8bit | paged_* (bitsandbytes')
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still reported)
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    eval_every: int = 0  # optimizer steps; 0 evaluates only at the start and the end
    eval_batch_size: int = 0  # rows per process in a forward without gradients (evaluation); 0: batch_size
    eval_generate: int = 0  # held-out rows scored by greedy generation (exact match); 0 disables
    max_new_tokens: int = 32
    save_every: int = 0  # optimizer steps between checkpoints; 0 saves none mid-run
    keep_checkpoints: int = 2
    log_every: int = 1
    compile: bool = False  # torch.compile the model (inductor); pays off on GPUs and for LoRA, costs a warm-up
    trim_memory: bool = False  # CPU: return freed heap pages to the OS after each backward (lower RSS, slower)
    fused_linear_loss: bool = False  # sft/dpo: output projection + log-softmax by chunks (pays with large vocabs)
    export_best: bool = False  # export the evaluated checkpoint with the lowest eval loss, not the last step
    early_stopping: int = 0  # stop after this many evaluations in a row without a new lowest eval loss (0: never)
    neftune_alpha: float = 0.0  # sft: NEFTune's noise on the input embeddings while training (0: off; 5 is typical)

    def __post_init__(self) -> None:
        _range("train.max_steps", self.max_steps, lo=0)
        _range("train.epochs", self.epochs, lo=0, lo_open=True)
        _range("train.batch_size", self.batch_size, lo=1)
        _range("train.grad_accum", self.grad_accum, lo=1)
        _range("train.batch_tokens", self.batch_tokens, lo=0)
        _range("train.lr", self.lr, lo=0, lo_open=True)
        _choice("train.lr_schedule", self.lr_schedule, SHAPES)
        _range("train.min_lr_ratio", self.min_lr_ratio, lo=0, hi=1)
        _range("train.warmup_steps", self.warmup_steps, lo=0)
        _range("train.warmup_ratio", self.warmup_ratio, lo=0, hi=1, hi_open=True)
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError(f"train.warmup_steps ({self.warmup_steps}) and train.warmup_ratio "
                              f"({self.warmup_ratio:g}): expected one of them, the other 0 (e.g. "
                              "train.warmup_steps=0 beside train.warmup_ratio=0.1 on the command line)")
        _range("train.weight_decay", self.weight_decay, lo=0)
        _range("train.adam_beta1", self.adam_beta1, lo=0, hi=1, hi_open=True)
        _range("train.adam_beta2", self.adam_beta2, lo=0, hi=1, hi_open=True)
        _range("train.adam_eps", self.adam_eps, lo=0, lo_open=True)
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _range("train.max_grad_norm", self.max_grad_norm, lo=0)
        _choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        for key in ("eval_every", "eval_batch_size", "eval_generate", "save_every", "keep_checkpoints",
                    "early_stopping"):
            _range(f"train.{key}", getattr(self, key), lo=0)
        _range("train.max_new_tokens", self.max_new_tokens, lo=1)
        _range("train.log_every", self.log_every, lo=1)
        _range("train.neftune_alpha", self.neftune_alpha, lo=0)

    @property
    def eval_rows(self) -> int:
        """Rows per process in each batch of held-out data (and of DPO's precomputed reference log-probs)."""
        return self.eval_batch_size or self.batch_size


@dataclass(frozen=True)
class RMConfig:
    center_rewards: float = 0.0  # coefficient of the mean squared (r_c + r_r) penalty (Eisenstein et al. 2023)

    def __post_init__(self) -> None:
        _range("rm.center_rewards", self.center_rewards, lo=0)


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    # one of DPO_LOSS_TYPES, or a list of them (not the reference-free simpo or orpo), added with
    # `loss_weights` (TRL's list; MPO: [sigmoid, bco_pair] with [0.8, 0.2], and its sft term as rpo_alpha)
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None  # with a list of loss types: one weight each (default: 1.0 each)
    label_smoothing: float = 0.0  # cDPO (sigmoid), the flip rate (robust) or EXO's eps (exo_pair)
    gamma: float = 0.5  # SimPO's target margin
    precompute_ref_logps: bool = False  # reference log-probs computed once before training and cached
    ref_model: str | None = None  # the reference policy's model when it is not the initial policy (same tokenizer)
    rpo_alpha: float = 0.0  # weight of the chosen response's NLL per token added to the loss (RPO); 0: none
    desirable_weight: float = 1.0  # kto: weight of the desirable (label true) rows' losses
    undesirable_weight: float = 1.0  # kto: weight of the undesirable rows' losses

    def __post_init__(self) -> None:
        _range("dpo.beta", self.beta, lo=0, lo_open=True)
        kinds = self.loss_types
        if not kinds:
            raise ConfigError("dpo.loss_type: expected a loss type or a list of them, got an empty list")
        for kind in kinds:
            _choice("dpo.loss_type", kind, DPO_LOSS_TYPES)
        alone = [kind for kind in kinds if kind in ALONE]
        if alone and len(kinds) > 1:
            why = "trains on unpaired rows" if alone[0] == "kto" else "uses no reference model"
            raise ConfigError(f"dpo.loss_type: {alone[0]} {why} and cannot be combined with other losses")
        if kinds == ["kto"] and self.rpo_alpha:
            raise ConfigError("dpo.rpo_alpha: not with kto, whose completions are not all desirable; leave it 0")
        _range("dpo.desirable_weight", self.desirable_weight, lo=0)
        _range("dpo.undesirable_weight", self.undesirable_weight, lo=0)
        if self.loss_weights is not None:
            if len(self.loss_weights) != len(kinds):
                raise ConfigError(f"dpo.loss_weights: expected one weight per loss type ({len(kinds)}), got "
                                  f"{len(self.loss_weights)}")
            for i, weight in enumerate(self.loss_weights):
                _range(f"dpo.loss_weights[{i}]", weight, lo=0)
        _range("dpo.label_smoothing", self.label_smoothing, lo=0, hi=0.5, hi_open=True)
        if "exo_pair" in kinds and not self.label_smoothing:
            raise ConfigError("dpo.label_smoothing: exo_pair needs a value above 0 (its eps; the paper uses 1e-3)")
        _range("dpo.gamma", self.gamma, lo=0)
        _range("dpo.rpo_alpha", self.rpo_alpha, lo=0)

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def reference_free(self) -> bool:
        return self.loss_types[0] in REFERENCE_FREE  # alone: checked above


@dataclass(frozen=True)
class LogConfig:
    progress: bool = True  # tqdm bar on the main process
    tensorboard: bool = True  # used when the tensorboard package is installed
    wandb: bool = False
    wandb_project: str = "finetune"


@dataclass(frozen=True)
class Recipe:
    task: str = "sft"
    output_dir: str = "runs/default"
    seed: int = 42
    resume: str | bool = "auto"  # auto | false | PATH of a checkpoint
    overwrite_output_dir: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _choice("task", self.task, TASKS)
        # an empty path (`output_dir=$UNSET` in a shell) would otherwise mean the current directory, or the hub
        for key, value in (("output_dir", self.output_dir), ("resume", self.resume),
                           ("model.name_or_path", self.model.name_or_path), ("model.revision", self.model.revision),
                           ("model.chat_template", self.model.chat_template), ("dpo.ref_model", self.dpo.ref_model)):
            if isinstance(value, str) and not value.strip():
                raise ConfigError(f"{key}: expected a path or name, got an empty string")
        if self.resume is True:
            raise ConfigError("resume: expected auto, false or a checkpoint path, got true")
        if self.data.packing and self.model.attn_implementation not in PACKING_ATTENTION:
            raise ConfigError(f"data.packing: needs model.attn_implementation in {', '.join(PACKING_ATTENTION)} "
                              "(attention that honours position_ids boundaries), got "
                              f"{self.model.attn_implementation}")
        if self.train.batch_tokens:
            if not self.data.packing:
                raise ConfigError("train.batch_tokens: token-budget micro-batches need data.packing: true")
            longest = self.data.max_length * (1 if self.task == "sft" else 2)  # a pair holds two sequences
            if self.train.batch_tokens < longest:
                raise ConfigError(f"train.batch_tokens: {self.train.batch_tokens} cannot hold the longest "
                                  f"{'row' if self.task == 'sft' else 'pair'} ({longest} tokens with "
                                  f"data.max_length={self.data.max_length}); raise it or lower data.max_length")
        t, held_out = self.train, bool(self.data.eval or self.data.eval_fraction)
        if t.export_best:
            if not held_out:
                raise ConfigError("train.export_best: needs held-out data to choose by (data.eval or "
                                  "data.eval_fraction)")
            if not t.save_every or not t.eval_every or t.save_every % t.eval_every:
                raise ConfigError(f"train.export_best: every checkpoint must be evaluated to choose among them: set "
                                  f"train.save_every (now {t.save_every}) to a multiple of train.eval_every (now "
                                  f"{t.eval_every}), both above 0")
        if t.early_stopping and not (held_out and t.eval_every):
            raise ConfigError("train.early_stopping: needs evaluations during the run to stop on: held-out data "
                              "(data.eval or data.eval_fraction) and train.eval_every above 0")
        if self.dpo.ref_model and self.dpo.reference_free:
            raise ConfigError(f"dpo.ref_model: dpo.loss_type {self.dpo.loss_types[0]} uses no reference model; "
                              "leave it unset")
        if self.train.neftune_alpha and self.task != "sft":
            raise ConfigError(f"train.neftune_alpha: NEFTune is for sft (instruction tuning), not {self.task}; it "
                              "would also perturb DPO's reference log-probs")
        if self.train.fused_linear_loss and self.task == "rm":
            raise ConfigError("train.fused_linear_loss: only sft and dpo compute a vocabulary loss; the rm task's "
                              "head has one output")
        if (self.model.load_in_4bit or self.model.load_in_8bit) and not self.lora.enabled:
            raise ConfigError("model.load_in_4bit/load_in_8bit: quantized weights cannot be trained; set lora.enabled")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def unused_settings(self) -> list[str]:
        """Keys set away from their defaults in a section this run does not use (LoRA's without lora.enabled,
        another task's section, 4-bit options without load_in_4bit): said as warnings at the start of a run, since
        each is most likely a forgotten switch. A recipe.yaml written by a run holds every section at its
        defaults, so reusing one for another task says nothing."""
        unused = {"lora": (not self.lora.enabled, "lora.enabled is false (all weights are trained)"),
                  "rm": (self.task != "rm", f"the task is {self.task}"),
                  "dpo": (self.task != "dpo", f"the task is {self.task}")}
        out = []
        for section, (off, why) in unused.items():
            keys = _changed(getattr(self, section), skip=("enabled",))
            if off and keys:
                out.append(f"{', '.join(f'{section}.{k}' for k in keys)}: set, but not used: {why}")
        quantization = [k for k in _changed(self.model) if k.startswith("bnb_4bit_")]
        if quantization and not self.model.load_in_4bit:
            out.append(f"{', '.join(f'model.{k}' for k in quantization)}: set, but not used: model.load_in_4bit "
                       "is false")
        t, d = self.train, self.data
        precomputing = self.task == "dpo" and self.dpo.precompute_ref_logps and not self.dpo.reference_free
        evaluating = [k for k in ("eval_every", "eval_batch_size", "eval_generate") if getattr(t, k)
                      and not (k == "eval_batch_size" and precomputing)]  # its reference pass uses it too
        if d.eval and d.eval_fraction:
            out.append("data.eval_fraction: set, but not used: data.eval names the held-out data")
        elif not d.eval and not d.eval_fraction and evaluating:
            out.append(f"{', '.join(f'train.{k}' for k in evaluating)}: set, but not used: no held-out data "
                       "(data.eval or data.eval_fraction)")
        if self.task == "dpo":
            kinds, changed = self.dpo.loss_types, _changed(self.dpo)
            named = ", ".join(kinds)
            for key, users, why in (("gamma", {"simpo"}, "it is simpo's target margin"),
                                    ("desirable_weight", {"kto"}, "it is kto's"),
                                    ("undesirable_weight", {"kto"}, "it is kto's"),
                                    ("label_smoothing", {"sigmoid", "robust", "exo_pair"},
                                     "it is for sigmoid, robust and exo_pair")):
                if key in changed and not users & set(kinds):
                    out.append(f"dpo.{key}: set, but not used: {why}, and dpo.loss_type is {named}")
            if "precompute_ref_logps" in changed and self.dpo.reference_free:
                out.append(f"dpo.precompute_ref_logps: set, but not used: dpo.loss_type {named} uses no reference "
                           "model")
        if "lion" in t.optimizer and "adam_eps" in _changed(t):
            out.append(f"train.adam_eps: set, but not used: train.optimizer {t.optimizer} has no epsilon")
        generating = [k for k in _changed(t) if k in ("eval_generate", "max_new_tokens")]
        if generating and self.task != "sft":
            out.append(f"{', '.join(f'train.{k}' for k in generating)}: set, but not used: the task is {self.task} "
                       "(exact match of generated answers is sft's)")
        return out


# --------------------------------------------------------------------------------------------- checks


def _changed(section: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """The keys of a config section whose values differ from the defaults."""
    default = type(section)()
    return [f.name for f in dataclasses.fields(section)
            if f.name not in skip and getattr(section, f.name) != getattr(default, f.name)]


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")


def _range(key: str, value: float, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> None:
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        left = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        right = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
        raise ConfigError(f"{key}: expected a value {' and '.join(s for s in (left, right) if s)}, got {value!r}")


def _describe(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(args[0], str(args[0]))
    if typing.get_origin(tp) is dict:
        return {(str, str): "a mapping of names to names", (str, float): "a mapping of names to numbers",
                (str, Any): "a mapping of names to values"}.get(args, str(tp))
    if args:  # a union: "a string, a list of strings or null"
        options = [_describe(a) for a in args if a is not type(None)] + (["null"] if type(None) in args else [])
        return ", ".join(options[:-1]) + " or " + options[-1]
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; convert only where YAML is lossy (ints as floats, '1e-4')."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for option in typing.get_args(tp):
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        return {_coerce(f"{key} (a name)", k, key_type): _coerce(f"{key}.{k}", v, value_type)
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (expected one of: {', '.join(names)})"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, tp)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------- loading


class RecipeLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true and false. PyYAML (YAML 1.1) also reads yes/no/on/off as
    booleans, so `train.mixed_precision=no` arrived as False and was refused as not a string."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "lora.r=32"]` -> a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        try:
            value = yaml.load(raw, Loader=RecipeLoader) if raw else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(nested, key, value)
    return nested


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[leaf] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = yaml.load(path.read_text(), Loader=RecipeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of recipe sections at the top level")
    return data


PATH_KEYS = ("output_dir", "resume", "model.name_or_path", "model.chat_template", "dpo.ref_model", "data.train",
             "data.eval")


def _home(value: Any) -> Any:
    """`~/x` as the user's home's x; a list's items and a mapping's keys (data sources) alike."""
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    if isinstance(value, list):
        return [_home(v) for v in value]
    if isinstance(value, dict):
        return {_home(k): v for k, v in value.items()}
    return value


def expand_home(data: dict[str, Any]) -> dict[str, Any]:
    """The recipe with `~` expanded in the keys that hold paths: Python's file functions take `~` literally, so
    output_dir: ~/runs/x would write to ./~/runs/x, and a model or data file under ~ would not be found."""
    out = dict(data)
    for dotted in PATH_KEYS:
        section, _, key = dotted.rpartition(".")
        holder = out.get(section) if section else out
        if isinstance(holder, dict) and key in holder:
            if section:
                holder = out[section] = dict(holder)
            holder[key] = _home(holder[key])
    return out


def load_recipe(recipe: str | Path | dict[str, Any] | Recipe, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a recipe from a YAML path or a dict, apply nested `overrides`, validate, and return it."""
    if isinstance(recipe, Recipe):
        recipe = recipe.to_dict()
    source = "recipe" if isinstance(recipe, dict) else str(recipe)
    data = dict(recipe) if isinstance(recipe, dict) else read_yaml(recipe)
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return _build(Recipe, expand_home(data))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
