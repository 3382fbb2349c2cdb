"""The embedded default: a tiny random-init Llama, a locally trained tokenizer, and small checkable tasks.

Nothing here touches the network. `builtin:tiny-llama` is generated deterministically on first use and cached
(as an ordinary `save_pretrained` directory, so it loads exactly like a real checkpoint); the rows of
`builtin:tasks`, `builtin:prefs` and `builtin:descending` are generated in memory from fixed seeds.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "builtin:"
VERSION = "v1"  # bump when the generated artifacts change, so stale caches are not reused

# ChatML with {% generation %} markers, so `return_assistant_tokens_mask` can find assistant tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>\n' -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ("cat dog sun moon tree bird fish star rock leaf rain snow wind fire lake hill road ship king queen "
         "red blue green gold milk tea cup pen box key").split()
TINY_LLAMA = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)


def home() -> Path:
    """finetune's own cache (builtin artifacts, tokenized datasets): FINETUNE_HOME or ~/.cache/finetune."""
    return Path(os.environ.get("FINETUNE_HOME", Path.home() / ".cache" / "finetune"))


def cache_dir() -> Path:
    return home() / "builtin" / VERSION


def is_builtin(name: str | None) -> bool:
    return bool(name) and name.startswith(BUILTIN_PREFIX)


# --------------------------------------------------------------------------------------------- tasks


def _problem(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("add", "reverse", "sort"))
    if kind == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return f"What is {a} + {b}?", str(a + b)
    if kind == "reverse":
        words = rng.sample(WORDS, rng.randint(3, 5))
        return "Reverse: " + " ".join(words), " ".join(reversed(words))
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
    return "Sort: " + " ".join(digits), " ".join(sorted(digits))


def _rows(name: str, problem: Any, split: str, n_train: int, n_test: int, seed: int) -> list[dict[str, Any]]:
    """Chat rows of distinct generated problems; the test split's prompts never occur in train."""
    if split not in ("train", "test"):
        raise ValueError(f"{name} has splits train and test, not {split!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    while len(rows) < n_train + n_test:
        prompt, answer = problem(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return rows[:n_train] if split == "train" else rows[n_train:]


def task_rows(split: str, n_train: int = 4000, n_test: int = 200, seed: int = 1234) -> list[dict[str, Any]]:
    """Chat rows for `builtin:tasks`: addition, word reversal, digit sorting; test prompts never occur in train."""
    return _rows("builtin:tasks", _problem, split, n_train, n_test, seed)


def _descending(rng: random.Random) -> tuple[str, str]:
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
    return "Sort descending: " + " ".join(digits), " ".join(sorted(digits, reverse=True))


def descending_rows(split: str, n_train: int = 2000, n_test: int = 200, seed: int = 4321) -> list[dict[str, Any]]:
    """Chat rows for `builtin:descending`: digits sorted largest first, a task `builtin:tasks` does not teach
    (its "Sort:" is ascending), for adapting a model trained on those (tiny_lora.yaml)."""
    return _rows("builtin:descending", _descending, split, n_train, n_test, seed)


def _wrong_answer(prompt: str) -> str:
    """A wrong answer of a kind a small model can learn to tell apart: concatenated numbers, an unsorted echo,
    or a degenerate repetition (a reversal that repeats its first word at the end)."""
    if prompt.startswith("What is "):
        a, b = prompt.removeprefix("What is ").removesuffix("?").split(" + ")
        return a + b  # "12 + 7" -> "127": concatenated instead of added
    items = prompt.split(": ", 1)[1].split()
    if prompt.startswith("Reverse: "):
        answer = items[::-1]
        return " ".join(answer + answer[:1])
    return " ".join(items) if items != sorted(items) else " ".join(reversed(items))  # unsorted echo


def preference_rows(split: str) -> list[dict[str, Any]]:
    """Conversational pairs for `builtin:prefs`: the correct answer (chosen) against a clearly wrong one; the
    prompts are those of `builtin:tasks` (same train/test split)."""
    rows = []
    for row in task_rows(split):
        user, answer = row["messages"]
        wrong = _wrong_answer(user["content"])
        if wrong == answer["content"]:
            continue
        rows.append({"chosen": [user, answer], "rejected": [user, {"role": "assistant", "content": wrong}]})
    return rows


BUILTIN_DATASETS = {"tasks": task_rows, "prefs": preference_rows, "descending": descending_rows}


def builtin_rows(name: str, split: str) -> list[dict[str, Any]]:
    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTIN_DATASETS:
        raise ValueError(f"unknown builtin dataset {name!r}; expected one of "
                         + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_DATASETS))
    return BUILTIN_DATASETS[key](split)


# --------------------------------------------------------------------------------------------- model


def _corpus() -> list[str]:
    texts = []
    for row in task_rows("train"):
        texts.extend(m["content"] for m in row["messages"])
    texts += ["user", "assistant", "system", "You are a helpful assistant.", "The quick brown fox jumps over "
              "the lazy dog.", "Hello, world! How are you today?"]
    return texts


def build_tokenizer(special_tokens: list[str] = SPECIAL_TOKENS, eos: str = "<|im_end|>",
                    chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """Byte-level BPE (digits split one by one) trained on the task corpus, with the ChatML template (the
    arguments make a base model's tokenizer for tests: no ChatML tokens, no template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|pad|>",
                                   unk_token=None, bos_token=None)
    fast.chat_template = chat_template
    return fast


def build_tiny_llama(tokenizer: Any, seed: int = 0) -> Any:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **TINY_LLAMA)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def ensure_builtin_model(name: str) -> Path:
    """Directory of a generated builtin model, created once (atomically, so parallel processes are safe)."""
    if name != "builtin:tiny-llama":
        raise ValueError(f"unknown builtin model {name!r}; expected builtin:tiny-llama")
    target = cache_dir() / "tiny-llama"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=target.parent))
    tokenizer = build_tokenizer()
    build_tiny_llama(tokenizer).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
