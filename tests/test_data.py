import json
from pathlib import Path

import datasets
import pytest
from conftest import as_sharegpt

from finetune.builtin import CHAT_TEMPLATE, builtin_rows, descending_rows, task_rows
from finetune.chat import chat_ids_and_mask
from finetune.data import detect_format, encode_dataset, encode_row, load_rows
from finetune.errors import DataError
from finetune.losses import IGNORE_INDEX

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Sort: 3 1 2"},
    {"role": "assistant", "content": "1 2 3"},
]


@pytest.fixture()
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def assistant_text(tok, ids, mask):
    return [tok.decode([i for i, m in zip(ids, mask, strict=True) if m])]


def test_mask_covers_exactly_the_assistant_turns(tok):
    ids, mask = chat_ids_and_mask(tok, CONVO)
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    kept = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert kept == "5<|im_end|>\n1 2 3<|im_end|>\n"


def test_template_without_generation_markers_gives_the_same_mask(tok):
    ids, mask = chat_ids_and_mask(tok, CONVO)
    tok.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids2, mask2 = chat_ids_and_mask(tok, CONVO)
    assert ids2 == ids and mask2 == mask and sum(mask) > 0


def test_unstable_template_is_refused(tok):
    # renders the last message differently from earlier ones: spans cannot be located by prefixes
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{% if loop.last %} [END]{% endif %}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match="generation %} markers"):
        chat_ids_and_mask(tok, CONVO, "f.jsonl: row 0")


def test_no_template_is_an_error(tok):
    tok.chat_template = None
    with pytest.raises(DataError, match="no.*chat template|has none"):
        chat_ids_and_mask(tok, CONVO)


def test_prompt_completion_masks_the_prompt(tok):
    row = encode_row({"prompt": "Reverse: cat dog", "completion": " dog cat"}, "prompt_completion", tok, 64, True, "x")
    n_prompt = len(tok("Reverse: cat dog")["input_ids"])
    assert all(lab == IGNORE_INDEX for lab in row["labels"][:n_prompt])
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["input_ids"][-1] == tok.eos_token_id


def test_completion_only_off_trains_on_everything(tok):
    row = encode_row({"messages": CONVO}, "chat", tok, 128, False, "x")
    assert row["labels"] == row["input_ids"]


def test_sharegpt_rows_encode_as_their_chat_messages(tok, tmp_path: Path):
    """`conversations` of {from, value} (axolotl's and LLaMA-Factory's ShareGPT) train exactly as `messages`."""
    from finetune.tasks.sft import generation_examples

    turns = as_sharegpt(CONVO)
    assert detect_format(["conversations", "id"], "x") == "sharegpt"
    shared = encode_row({"conversations": turns}, "sharegpt", tok, 128, True, "x")
    chat = encode_row({"messages": CONVO}, "chat", tok, 128, True, "x")
    assert (shared["input_ids"], shared["labels"]) == (chat["input_ids"], chat["labels"])
    alias = [dict(t, **{"from": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"])}) for t in turns]
    assert encode_row({"conversations": alias}, "sharegpt", tok, 128, True, "x")["labels"] == chat["labels"]
    # the held-out rows' reference answers for exact match come from the last gpt turn
    path = tmp_path / "sharegpt.jsonl"
    path.write_text(json.dumps({"conversations": turns}) + "\n")
    rows = load_rows(str(path), "train")
    assert generation_examples(rows, "s", "auto", tok, 4) == generation_examples([{"messages": CONVO}], "c", "auto",
                                                                                 tok, 4)


def test_llama_factory_system_prompts_are_kept_or_refused_by_row(tok):
    """LLaMA-Factory's ShareGPT `system` field is the conversation's system prompt (it was dropped without a
    word); its alpaca `system` and `history`, which the Alpaca prompt has no place for, are refused by row."""
    turns = as_sharegpt(CONVO)
    chat = encode_row({"messages": CONVO}, "chat", tok, 128, True, "x")
    with_field = encode_row({"conversations": turns[1:], "system": CONVO[0]["content"]}, "sharegpt", tok, 128, True,
                            "x")
    assert (with_field["input_ids"], with_field["labels"]) == (chat["input_ids"], chat["labels"])
    both = encode_row({"conversations": turns, "system": CONVO[0]["content"]}, "sharegpt", tok, 128, True, "x")
    assert both == chat
    with pytest.raises(DataError, match=r"^x: a 'system' field beside a conversation that begins with another"):
        encode_row({"conversations": turns, "system": "Be long."}, "sharegpt", tok, 128, True, "x")
    alpaca = {"instruction": "Sort: 3 1 2", "input": "", "output": "1 2 3"}
    assert encode_row({**alpaca, "system": "", "history": []}, "alpaca", tok, 128, True, "x") == \
        encode_row(alpaca, "alpaca", tok, 128, True, "x")
    for key, value in (("history", [["What is 2 + 3?", "5"]]), ("system", "Be brief.")):
        with pytest.raises(DataError, match=rf"^x: an alpaca row with '{key}' \(LLaMA-Factory's multi-turn alpaca\)"):
            encode_row({**alpaca, key: value}, "alpaca", tok, 128, True, "x")


def test_an_answer_of_weight_0_is_not_trained(tok):
    """OpenAI's fine-tuning format (and axolotl's ShareGPT turns): an assistant message's `weight` 0 leaves its
    tokens out of the loss, found by the template's {% generation %} spans or by rendering alike; 1 is as none."""
    from finetune.pairs import encode_pair

    def trained(messages, fmt="chat"):
        turns = [{**t, **({"weight": m["weight"]} if "weight" in m else {})}
                 for t, m in zip(as_sharegpt(messages), messages, strict=True)]
        row = {"messages": messages} if fmt == "chat" else {"conversations": turns}
        return tok.decode([t for t in encode_row(row, fmt, tok, 128, True, "x")["labels"] if t != IGNORE_INDEX])

    skip_first = [*CONVO[:2], {**CONVO[2], "weight": 0}, *CONVO[3:]]
    unmarked = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for template in (CHAT_TEMPLATE, unmarked):
        tok.chat_template = template
        assert trained(skip_first) == "1 2 3<|im_end|>\n"
        assert trained([*CONVO[:4], {**CONVO[4], "weight": 0}]) == "5<|im_end|>\n"
        assert trained([*CONVO[:2], {**CONVO[2], "weight": 1}, *CONVO[3:]]) == trained(CONVO) == \
            "5<|im_end|>\n1 2 3<|im_end|>\n"
    assert trained(skip_first, "sharegpt") == "1 2 3<|im_end|>\n"
    for messages in ([*CONVO[:2], {**CONVO[2], "weight": 0.5}], [{**CONVO[0], "weight": 0}, *CONVO[1:]]):
        with pytest.raises(DataError, match=r"^x: messages\[\d\]\.weight is 0(\.5)?; expected 0 or 1 on an assistant"):
            encode_row({"messages": messages}, "chat", tok, 128, True, "x")
    with pytest.raises(DataError, match=r"^x \(chosen\): messages\[0\]\.weight is 0; expected 0 or 1 on an assist"):
        encode_pair({"prompt": CONVO[:2], "chosen": [{**CONVO[2], "weight": 0}], "rejected": CONVO[4:5]}, tok, 64, 32,
                    "x")


def test_content_given_as_text_parts_is_their_text(tok):
    """OpenAI's and multimodal datasets' layout, content as a list of parts: text parts train as the text they
    make together (chat rows, conversational prompt/completion, exact match's reference, preference pairs);
    another part (an image) is refused by name."""
    from finetune.pairs import encode_pair
    from finetune.tasks.sft import generation_examples

    def parts(messages: list) -> list:  # each content split in two text parts
        return [{**m, "content": [{"type": "text", "text": m["content"][:2]},
                                  {"type": "text", "text": m["content"][2:]}]} for m in messages]

    plain = encode_row({"messages": CONVO}, "chat", tok, 128, True, "x")
    split = encode_row({"messages": parts(CONVO)}, "chat", tok, 128, True, "x")
    assert (split["input_ids"], split["labels"]) == (plain["input_ids"], plain["labels"])
    row = {"prompt": parts(CONVO[:-1]), "completion": parts(CONVO[-1:])}
    assert encode_row(row, "prompt_completion", tok, 128, True, "x")["labels"] == encode_row(
        {"prompt": CONVO[:-1], "completion": CONVO[-1:]}, "prompt_completion", tok, 128, True, "x")["labels"]
    assert generation_examples([{"messages": parts(CONVO)}], "p", "auto", tok, 4) == generation_examples(
        [{"messages": CONVO}], "m", "auto", tok, 4)
    pair = {"chosen": CONVO, "rejected": CONVO[:-1] + [{"role": "assistant", "content": "3 2 1"}]}
    assert encode_pair({k: parts(v) for k, v in pair.items()}, tok, 128, 64, "x") == encode_pair(pair, tok, 128, 64,
                                                                                                   "x")
    image = [{"role": "user", "content": [{"type": "image", "url": "cat.png"}]}, CONVO[2]]
    with pytest.raises(DataError, match=r"^x: messages\[0\]\.content\[0\] is a 'image' part; expected text parts"):
        encode_row({"messages": image}, "chat", tok, 128, True, "x")


def test_conversational_prompt_completion_rows(tok):
    """prompt/completion message lists: the completion is what trains (a multi-turn prompt's assistant turn is
    not, unlike the same conversation as `messages`); exact match prompts with the conversation so far; a text
    prompt beside a message-list completion is refused by name."""
    from finetune.tasks.sft import generation_examples

    row = {"prompt": CONVO[:-1], "completion": CONVO[-1:]}
    ours = encode_row(row, "prompt_completion", tok, 128, True, "x")
    chat = encode_row({"messages": CONVO}, "chat", tok, 128, True, "x")
    assert ours["input_ids"] == chat["input_ids"]
    assert tok.decode([t for t in ours["labels"] if t != IGNORE_INDEX]) == "1 2 3<|im_end|>\n"
    assert tok.decode([t for t in chat["labels"] if t != IGNORE_INDEX]) == "5<|im_end|>\n1 2 3<|im_end|>\n"
    assert generation_examples([row], "c", "auto", tok, 4) == generation_examples([{"messages": CONVO}], "m",
                                                                                 "auto", tok, 4)
    with pytest.raises(DataError, match=r"^x: expected 'prompt' and 'completion' to be both strings or both message"):
        encode_row({"prompt": "Sort: 3 1 2", "completion": CONVO[-1:]}, "prompt_completion", tok, 128, True, "x")


# ChatML with tools (listed in a system turn) and tool calls, the way real templates render them
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}<tool_call>{{ c['function'] | tojson }}</tool_call>"
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endgeneration %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NUMBER = {"type": "number"}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": NUMBER, "b": NUMBER}}}}]
TOOL_CHAT = [{"role": "user", "content": "What is 2 + 3?"},
             {"role": "assistant", "content": None,
              "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
             {"role": "tool", "content": "5"},
             {"role": "assistant", "content": "5"}]


def test_tool_calls_and_tools_match_trl_sft_trainer(tiny_dir, tmp_path: Path):
    """Rows with `tools` (JSON text, as hub datasets hold them, or a list) and assistant tool calls: the same ids
    and assistant-only labels as TRL's SFTTrainer, with the template's generation markers and without them
    (our spans by rendering); the tool call trains, the tool's answer does not; exact match prompts with the tools."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from finetune.tasks.sft import generation_examples

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = TOOL_TEMPLATE
    rows = [{"messages": TOOL_CHAT, "tools": json.dumps(TOOLS)},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
             "tools": None}]
    args = SFTConfig(output_dir=str(tmp_path), max_length=1024, assistant_only_loss=True, report_to="none",
                     bf16=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    ours, _ = encode_dataset(rows, "mem", "chat", tok, 1024, True, progress=False)
    assert trainer.train_dataset["input_ids"] == ours["input_ids"]
    assert trainer.train_dataset["labels"] == ours["labels"]
    trained = tok.decode([t for t in ours["labels"][0] if t != IGNORE_INDEX])
    assert trained.startswith('<tool_call>{"name": "add"') and "Tools:" not in trained
    assert trained.endswith("</tool_call><|im_end|>\n5<|im_end|>\n")
    listed = {"messages": TOOL_CHAT, "tools": TOOLS}
    tok.chat_template = TOOL_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    unmarked = encode_row(listed, "chat", tok, 1024, True, "x")
    assert (unmarked["input_ids"], unmarked["labels"]) == (ours["input_ids"][0], ours["labels"][0])
    [(prompt, answer)] = generation_examples([listed], "t", "auto", tok, 4)
    assert answer == "5" and "Tools: " in tok.decode(prompt)
    with pytest.raises(DataError, match=r"^x: 'tools' is text but not JSON"):
        encode_row({**listed, "tools": "add(a, b)"}, "chat", tok, 1024, True, "x")
    with pytest.raises(DataError, match=r"^x: expected messages\[1\]\.tool_calls to be a list, got str"):
        encode_row({"messages": [TOOL_CHAT[0], {**TOOL_CHAT[1], "tool_calls": "add"}]}, "chat", tok, 1024, True, "x")


def test_tools_a_template_would_drop_are_refused(tok):
    """The builtin ChatML template mentions neither tool calls nor tools: it would render a tool call's content
    as "None" and leave the tools out, so such rows are refused by name instead of trained on."""
    from finetune.pairs import encode_pair

    assert "tool" not in tok.chat_template
    with pytest.raises(DataError, match=r"^x: the row has tool_calls, and the chat template never renders"):
        encode_row({"messages": TOOL_CHAT}, "chat", tok, 1024, True, "x")
    with pytest.raises(DataError, match=r"^x: the row has tools, and the chat template never renders tools"):
        encode_row({"messages": CONVO, "tools": TOOLS}, "chat", tok, 1024, True, "x")
    with pytest.raises(DataError, match=r"^x: the row has tools"):
        encode_row({"prompt": CONVO[:-1], "completion": CONVO[-1:], "tools": TOOLS}, "prompt_completion", tok, 1024,
                   True, "x")
    with pytest.raises(DataError, match=r"^x: the row has tools"):
        encode_pair({"prompt": CONVO[:1], "chosen": CONVO[1:2], "rejected": CONVO[3:4], "tools": TOOLS}, tok, 1024,
                    512, "x")


# Qwen3's way with thinking, reduced: the last assistant turn carries a think block, and `enable_thinking=false`
# puts the empty block into the generation prompt instead, so that it is prompt, not completion
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
ASK = [{"role": "user", "content": "What is 2 + 3?"}]
ANSWER = [{"role": "assistant", "content": "5"}]


def test_chat_template_kwargs_match_trl_per_row_and_from_the_recipe(tiny_dir, tmp_path: Path):
    """Template variables (Qwen3's enable_thinking): a row's `chat_template_kwargs` give TRL's SFTTrainer's ids and
    completion labels; the recipe's data.chat_template_kwargs give the same for rows without them, and a row's own
    win over the recipe's; chat rows (spans by rendering), exact-match prompts and pairs render with them too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import apply_chat_template

    from finetune.pairs import encode_pair
    from finetune.tasks.sft import generation_examples

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = THINK_TEMPLATE
    off = {"enable_thinking": False}
    rows = [{"prompt": ASK, "completion": ANSWER, "chat_template_kwargs": off}]
    args = SFTConfig(output_dir=str(tmp_path), max_length=1024, report_to="none", bf16=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    ours = encode_row(rows[0], "prompt_completion", tok, 1024, True, "x")
    assert (ours["input_ids"], ours["labels"]) == (trainer.train_dataset[0]["input_ids"],
                                                   trainer.train_dataset[0]["labels"])
    assert tok.decode([t for t in ours["labels"] if t != IGNORE_INDEX]) == "5<|im_end|>\n"

    bare = {"prompt": ASK, "completion": ANSWER}
    thinking = encode_row(bare, "prompt_completion", tok, 1024, True, "x")
    assert tok.decode([t for t in thinking["labels"] if t != IGNORE_INDEX]) == "<think>\n\n</think>\n\n5<|im_end|>\n"
    assert encode_row(bare, "prompt_completion", tok, 1024, True, "x", off) == ours
    on = {**bare, "chat_template_kwargs": json.dumps({"enable_thinking": True})}  # JSON text, as in hub sets
    assert encode_row(on, "prompt_completion", tok, 1024, True, "x", off) == thinking
    chat = encode_row({"messages": ASK + ANSWER}, "chat", tok, 1024, True, "x", off)
    assert (chat["input_ids"], chat["labels"]) == (ours["input_ids"], ours["labels"])
    [(prompt, _)] = generation_examples([bare], "t", "auto", tok, 4, template_kwargs=off)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")

    pair = {"prompt": ASK, "chosen": ANSWER, "rejected": [{"role": "assistant", "content": "6"}]}
    texts = apply_chat_template({**pair, "chat_template_kwargs": off}, tok)
    enc = encode_pair(pair, tok, 64, 32, "x", off)
    assert [tok.decode(enc[k]) for k in ("prompt", "chosen", "rejected")] == \
        [texts[k] for k in ("prompt", "chosen", "rejected")]
    assert encode_pair({**pair, "chat_template_kwargs": off}, tok, 64, 32, "x") == enc != encode_pair(pair, tok, 64,
                                                                                                       32, "x")


def test_chat_template_kwargs_that_cannot_reach_the_template_are_refused(tiny_dir):
    from transformers import AutoTokenizer

    from finetune.pairs import encode_pair

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = THINK_TEMPLATE
    row = {"prompt": ASK, "completion": ANSWER}
    with pytest.raises(DataError, match=r"^data\.chat_template_kwargs\.tools: an argument of apply_chat_template, "):
        encode_row(row, "prompt_completion", tok, 64, True, "x", {"tools": []})
    with pytest.raises(DataError, match=r"^x: chat_template_kwargs\.add_generation_prompt: an argument of "):
        encode_row({**row, "chat_template_kwargs": {"add_generation_prompt": True}}, "prompt_completion", tok, 64,
                   True, "x")
    with pytest.raises(DataError, match=r"^data\.chat_template_kwargs\.enable_reasoning: the chat template never "
                                        r"reads enable_reasoning$"):
        encode_row({"messages": ASK + ANSWER}, "chat", tok, 64, True, "x", {"enable_reasoning": False})
    with pytest.raises(DataError, match=r"^x: chat_template_kwargs\.enable_reasoning: the chat template never"):
        encode_pair({**row, "chosen": ANSWER, "rejected": ANSWER, "chat_template_kwargs": {"enable_reasoning": 1}},
                    tok, 64, 32, "x")
    with pytest.raises(DataError, match=r"^x: 'chat_template_kwargs' is text but not JSON"):
        encode_row({**row, "chat_template_kwargs": "enable_thinking"}, "prompt_completion", tok, 64, True, "x")
    with pytest.raises(DataError, match=r"^x: expected 'chat_template_kwargs' to be a mapping of template "
                                        r"variables, got list"):
        encode_row({**row, "chat_template_kwargs": ["enable_thinking"]}, "prompt_completion", tok, 64, True, "x")
    # a variable set to null is passed on and not checked: Arrow gives every row each key of the column's struct
    none = encode_row({**row, "chat_template_kwargs": {"enable_thinking": None, "xml_tools": None}},
                      "prompt_completion", tok, 64, True, "x")
    assert none == encode_row(row, "prompt_completion", tok, 64, True, "x")


def test_recipe_chat_template_kwargs_are_part_of_the_tokenized_cache_key(tiny_dir, tmp_path: Path, monkeypatch):
    from transformers import AutoTokenizer

    from finetune.config import load_recipe
    from finetune.pairs import build_pair_data
    from finetune.tasks.sft import SFTTask

    monkeypatch.setattr("finetune.tokenized.cache_root", lambda: tmp_path / "tokenized")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = THINK_TEMPLATE
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps({"prompt": ASK, "completion": ANSWER}) + "\n")

    def trained(**overrides) -> str:
        recipe = load_recipe({"data": {"train": str(train)}, "log": {"progress": False}}, overrides)
        labels = SFTTask().build_data(recipe, tok).train["labels"][0]
        return tok.decode([t for t in labels if t != IGNORE_INDEX])

    off = {"data": {"chat_template_kwargs": {"enable_thinking": False}}}
    assert trained() == "<think>\n\n</think>\n\n5<|im_end|>\n"
    assert trained(**off) == "5<|im_end|>\n"
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": ASK, "chosen": ANSWER, "rejected": ANSWER}) + "\n")

    def prompt(**overrides) -> str:
        recipe = load_recipe({"task": "dpo", "data": {"train": str(pairs)}, "log": {"progress": False}}, overrides)
        return tok.decode(build_pair_data(recipe, tok, progress=False)[0]["prompt"][0])

    assert prompt().endswith("assistant\n") and prompt(**off).endswith("assistant\n<think>\n\n</think>\n\n")
    assert len(list((tmp_path / "tokenized").iterdir())) == 4


def test_sharegpt_function_calls_are_tool_calls(tiny_dir):
    """LLaMA-Factory's ShareGPT function calling: `function_call` turns (the call as JSON) and `observation`
    turns train exactly as the same conversation in messages with tool_calls and a tool turn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = TOOL_TEMPLATE
    turns = [{"from": "human", "value": "What is 2 + 3?"},
             {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})},
             {"from": "observation", "value": "5"}, {"from": "gpt", "value": "5"}]
    shared = encode_row({"conversations": turns, "tools": json.dumps(TOOLS)}, "sharegpt", tok, 1024, True, "x")
    chat = encode_row({"messages": TOOL_CHAT, "tools": TOOLS}, "chat", tok, 1024, True, "x")
    assert (shared["input_ids"], shared["labels"]) == (chat["input_ids"], chat["labels"])
    with pytest.raises(DataError, match=r"^x: conversations\[1\] is a function_call whose value is not JSON"):
        encode_row({"conversations": [turns[0], {"from": "function_call", "value": "add(2, 3)"}]}, "sharegpt", tok,
                   1024, True, "x")
    for value in ('{"arguments": {"a": 2}}', '"add"', "[]", '[{"name": "add"}, 3]'):
        with pytest.raises(DataError, match=r"^x: conversations\[1\] is a function_call; expected its value to be "):
            encode_row({"conversations": [turns[0], {"from": "function_call", "value": value}]}, "sharegpt", tok,
                       1024, True, "x")


@pytest.mark.parametrize("turns, says", [
    ([{"from": "bot", "value": "hi"}], r"conversations\[0\]\.from is 'bot'; expected one of system, human, user"),
    ([{"from": "human"}], r"conversations\[0\] must have 'from' and 'value'"),
    ([], "expected 'conversations' to be a non-empty list"),
    ([{"from": "human", "value": 3}], r"expected messages\[0\]\.content to be a string, got int"),
])
def test_bad_sharegpt_rows_name_the_row_and_the_turn(tok, turns, says):
    with pytest.raises(DataError, match=f"^f.jsonl: row 1: {says}"):
        encode_dataset([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
                        {"conversations": turns}], "f.jsonl", "auto", tok, 64, True)


def test_alpaca_and_text_formats(tok):
    row = encode_row({"instruction": "Add", "input": "2 3", "output": "5"}, "alpaca", tok, 256, True, "x")
    assert tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "5<|im_end|>"
    assert "### Input:\n2 3" in tok.decode(row["input_ids"])
    text = encode_row({"text": "hello world"}, "text", tok, 64, True, "x")
    assert text["labels"] == text["input_ids"]


def test_truncation_counted_and_empty_rows_dropped(tok, caplog):
    rows = [{"prompt": "word " * 40, "completion": "x"},  # prompt alone fills max_length: no target left
            {"prompt": "a", "completion": " b" * 40},  # truncated, but keeps targets
            {"prompt": "a", "completion": " b"}]
    ds, stats = encode_dataset(rows, "mem", "auto", tok, 16, True)
    assert (stats.rows, stats.kept, stats.truncated, stats.dropped_no_target) == (3, 2, 2, 1)
    assert len(ds) == 2 and all(len(r) <= 16 for r in ds["input_ids"])
    assert "2 of 3 rows truncated" in caplog.text
    assert "dropped 1 of 3 rows whose every trained token lies beyond data.max_length=16 (first: row 0)" in caplog.text
    assert "no token to train on" not in caplog.text


def test_a_chat_row_without_an_assistant_message_is_dropped_for_that_reason(tok, caplog):
    """Not reported as lost to truncation: it had nothing to train on at any length."""
    rows = [{"messages": CONVO}, {"messages": [{"role": "user", "content": "hi"}]}]
    ds, stats = encode_dataset(rows, "mem", "auto", tok, 128, True)
    assert (stats.kept, stats.truncated, stats.dropped_no_target) == (1, 0, 1)
    assert "mem: dropped 1 of 2 rows with no token to train on (no assistant message; first: row 1)" in caplog.text
    assert "max_length" not in caplog.text


def test_all_rows_dropped_is_an_error(tok):
    rows = [{"prompt": "word " * 40, "completion": "x"}]
    with pytest.raises(DataError, match="no row has a trainable token"):
        encode_dataset(rows, "mem.jsonl", "auto", tok, 8, True)


def test_malformed_row_names_file_and_row(tok, tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    rows = task_rows("train")[:3] + [{"messages": [{"role": "user", "content": 7}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_rows(str(path), "train")
    with pytest.raises(DataError) as e:
        encode_dataset(ds, str(path), "auto", tok, 64, True)
    assert f"{path}: row 3" in str(e.value) and "messages[0].content" in str(e.value)


def test_format_detection():
    assert detect_format(["messages"], "f") == "chat"
    assert detect_format(["prompt", "completion", "id"], "f") == "prompt_completion"
    assert detect_format(["instruction", "input", "output"], "f") == "alpaca"
    with pytest.raises(DataError, match="cannot tell the format from columns"):
        detect_format(["question", "answer"], "f.jsonl")
    with pytest.raises(DataError, match="needs column"):
        detect_format(["text"], "f", "chat")


def test_local_files_and_missing_ones(tmp_path: Path):
    rows = [{"text": "a"}, {"text": "b"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert load_rows(str(tmp_path / "d.parquet"), "train")["text"] == ["a", "b"]
    with pytest.raises(DataError, match="file not found"):
        load_rows(str(tmp_path / "missing.jsonl"), "train")
    for local in ("data/train/shards", "~nobody/x", "cache/"):
        with pytest.raises(DataError, match=f"^{local}: file not found"):  # no hub id looks so
            load_rows(local, "train")
    with pytest.raises(DataError, match="unknown builtin dataset"):
        load_rows("builtin:nope", "train")
    for empty in ("e.jsonl", "e.json", "e.parquet"):  # would be misreported as data of an unknown format
        (tmp_path / empty).write_text("\n" if empty != "e.json" else "[]")
        if empty == "e.parquet":
            datasets.Dataset.from_dict({"text": []}).to_parquet(str(tmp_path / empty))
        with pytest.raises(DataError, match=f"^{tmp_path / empty}: no rows$"):
            load_rows(str(tmp_path / empty), "train")


def test_byte_order_mark_and_non_utf8_files(tmp_path: Path):
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')  # as Windows editors save
    assert load_rows(str(tmp_path / "bom.jsonl"), "train") == [{"text": "a"}, {"text": "b"}]
    # lines end at newlines only: U+2028 may stand unescaped in a JSON string (json.dumps(ensure_ascii=False))
    (tmp_path / "u.jsonl").write_text('{"text": "a\u2028b"}\r\n\n{"text": "c"}\n', encoding="utf-8")
    rows = load_rows(str(tmp_path / "u.jsonl"), "train")
    assert rows == [{"text": "a\u2028b"}, {"text": "c"}] and rows.numbering.numbers == [1, 3]
    (tmp_path / "list.json").write_text('\n  [{"text": "a"},\n   {"text": "b"}]\n')
    assert load_rows(str(tmp_path / "list.json"), "train") == [{"text": "a"}, {"text": "b"}]
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=f"^{tmp_path / 'latin1.jsonl'}: not UTF-8 text \\(byte 13\\)"):
        load_rows(str(tmp_path / "latin1.jsonl"), "train")


def test_a_directory_of_data_files_with_split_names(tmp_path: Path):
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    for name, texts in [("train-00000-of-00002.jsonl", ["a", "b"]), ("train-00001-of-00002.jsonl", ["c"]),
                        ("test-00000-of-00001.jsonl", ["t"])]:
        (repo / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert sorted(load_rows(str(tmp_path / "repo"), "train")["text"]) == ["a", "b", "c"]
    assert load_rows(str(tmp_path / "repo"), "test")["text"] == ["t"]
    with pytest.raises(DataError, match="repo: a directory that datasets could not load split 'validation' from"):
        load_rows(str(tmp_path / "repo"), "validation")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: a directory that datasets could not load split 'train' from"):
        load_rows(str(tmp_path / "empty"), "train")


def test_a_subset_is_named_after_a_colon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A dataset with subsets (`datasets`' configs, as openai/gsm8k's main and socratic): a local clone of its
    repository, whose card lists them, and a hub name, whose subset reaches `datasets.load_dataset`."""
    import datasets

    repo = tmp_path / "gsm"
    for subset, texts in [("main", ["a", "b"]), ("socratic", ["s"])]:
        (repo / subset).mkdir(parents=True)
        (repo / subset / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.jsonl\n"
        for s in ("main", "socratic")) + "---\n")
    assert load_rows(f"{repo}:socratic", "train")["text"] == ["s"]
    assert sorted(load_rows(f"{repo}:main", "train")["text"]) == ["a", "b"]
    with pytest.raises(DataError, match=rf"^{repo}: .* it has subsets \(main, socratic\): name one after a colon, "
                                        rf"as {repo}:main$"):
        load_rows(str(repo), "train")
    with pytest.raises(DataError, match=r"gsm:other: .*'other' not found"):
        load_rows(f"{repo}:other", "train")
    with pytest.raises(DataError, match=r"train.jsonl:main: a subset after the colon names a part of a dataset "):
        load_rows(f"{repo}/main/train.jsonl:main", "train")
    with pytest.raises(DataError, match=r"gsm:v2.jsonl: file not found"):  # a missing file, not a subset
        load_rows(f"{repo}:v2.jsonl", "train")
    colon = tmp_path / "a:b.jsonl"  # an existing file keeps its colon
    colon.write_text(json.dumps({"text": "c"}) + "\n")
    assert load_rows(str(colon), "train") == [{"text": "c"}]

    calls = []
    monkeypatch.setattr("finetune.data.hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kw: calls.append((args, kw)) or [{"text": "h"}])
    load_rows("openai/gsm8k:main", "test")
    load_rows("someone/plain", "train")
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"}), (("someone/plain", None), {"split": "train"})]


@pytest.mark.parametrize("rows", [task_rows, descending_rows])
def test_builtin_test_split_is_held_out(rows):
    train = {r["messages"][0]["content"] for r in rows("train")}
    test = [r["messages"][0]["content"] for r in rows("test")]
    assert len(test) == 200 and not train.intersection(test)
    assert rows("test") == rows("test")  # deterministic


def test_builtin_descending_answers_are_the_digits_largest_first():
    for row in descending_rows("train")[:200] + descending_rows("test"):
        user, answer = (m["content"] for m in row["messages"])
        digits = user.removeprefix("Sort descending: ").split()
        assert 3 <= len(digits) <= 6 and answer == " ".join(sorted(digits, key=int, reverse=True))
    assert builtin_rows("builtin:descending", "test") == descending_rows("test")


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(DataError, match="hub cannot be reached"):
        load_rows("someone/some-dataset", "train")


@pytest.mark.parametrize("fmt, max_length", [("chat", 64), ("chat", 24), ("prompt_completion", 64),
                                             ("prompt_completion", 6), ("conversational", 64),
                                             ("conversational", 24)])
def test_tokens_and_labels_match_trl_sft_trainer(tok, tiny_dir, tmp_path: Path, fmt: str, max_length: int):
    """TRL as the oracle: its SFTTrainer's prepared rows (completion-only / assistant-only loss, truncation,
    fully masked rows dropped) have the same input ids and labels as ours, row for row. `conversational`:
    prompt_completion rows whose prompt and completion are message lists (TRL's conversational layout)."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    chat = task_rows("train")[:30] + [{"messages": CONVO}]
    if fmt == "chat":
        rows = chat
    elif fmt == "conversational":  # the last one: a multi-turn prompt, whose assistant turn is not trained on
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in chat]
    else:
        rows = [{"prompt": r["messages"][0]["content"], "completion": " " + r["messages"][1]["content"]}
                for r in chat[:30]]
    fmt = "prompt_completion" if fmt == "conversational" else fmt
    args = SFTConfig(output_dir=str(tmp_path), max_length=max_length, assistant_only_loss=fmt == "chat",
                     report_to="none", bf16=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    ours, stats = encode_dataset(rows, "mem", fmt, tok, max_length, True, progress=False)
    assert len(ours) > 0 and (max_length == 64 or stats.truncated > 0 and stats.dropped_no_target > 0)
    assert trainer.train_dataset["input_ids"] == ours["input_ids"]
    assert trainer.train_dataset["labels"] == ours["labels"]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sft_loss_of_a_real_model_matches_trl(tok, tiny_dir, tmp_path: Path, packed: bool):
    """TRL as the oracle end to end: SFTTrainer.compute_loss (mean over assistant tokens) of the tiny model on 8
    chat rows equals our SFT task's summed loss over the batch's target count, padded or packed."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from finetune import attention
    from finetune.collate import CausalLMCollator
    from finetune.tasks.sft import SFTTask

    rows = task_rows("train")[:7] + [{"messages": CONVO}]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    args = SFTConfig(output_dir=str(tmp_path), max_length=64, assistant_only_loss=True, report_to="none",
                     bf16=False, per_device_eval_batch_size=8)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    with torch.no_grad():
        theirs = trainer.compute_loss(model, next(iter(trainer.get_eval_dataloader(trainer.train_dataset))))

    if packed:
        attention.register()
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attention.NAME).eval()
    task = SFTTask()
    task.keep_logits = True
    ours_rows, _ = encode_dataset(rows, "mem", "chat", tok, 64, True, progress=False)
    batch = CausalLMCollator(tok.pad_token_id, packed=packed)(list(ours_rows))
    with torch.no_grad():
        ours = task.loss(model, batch).loss_sum / batch["num_items"]
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


class KilledWorker:
    """A tokenizer whose use kills the forked worker process, as the kernel's out-of-memory killer would."""

    def __init__(self, tok):
        self.tok = tok
        self.parent = __import__("os").getpid()

    def __getattr__(self, name):
        import os
        import signal

        if os.getpid() != self.parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return getattr(self.tok, name)


def test_tokenizing_in_forked_workers_gives_the_same_rows_and_names_the_first_bad_row(tok, monkeypatch):
    from concurrent.futures import ProcessPoolExecutor

    from finetune.data import ROWS_PER_WORKER, tokenizer_workers

    chunks = []
    pool_map = ProcessPoolExecutor.map

    def spied(self, fn, tasks, *args, **kwargs):
        chunks.extend(tasks)
        return pool_map(self, fn, chunks, *args, **kwargs)

    monkeypatch.setattr(ProcessPoolExecutor, "map", spied)
    rows = task_rows("train")[:4 * ROWS_PER_WORKER]
    one, one_stats = encode_dataset(rows, "mem", "chat", tok, 32, True, progress=False)
    assert not chunks
    two, two_stats = encode_dataset(rows, "mem", "chat", tok, 32, True, progress=False, workers=2)
    assert chunks[0] == (0, 250) and chunks[-1][1] == len(rows)  # 16 chunks, 8 per worker
    assert two.to_dict() == one.to_dict() and two_stats == one_stats and one_stats.truncated > 0
    broken = list(rows)
    broken[3900] = {"messages": [{"role": "user", "content": 3}]}
    broken[2500] = {"messages": "not a list"}  # an earlier row, in a later-started chunk than some
    with pytest.raises(DataError, match=r"^mem: row 2500: "):
        encode_dataset(broken, "mem", "chat", tok, 64, True, progress=False, workers=4)
    with pytest.raises(DataError, match=r"^mem: a tokenizing process died \(out of memory\?\); set data.num_proc"):
        encode_dataset(rows, "mem", "chat", KilledWorker(tok), 32, True, progress=False, workers=2)
    assert tokenizer_workers(3) == 3 and 1 <= tokenizer_workers(0) <= 8
    monkeypatch.setenv("LOCAL_RANK", "1")  # another process of a distributed run: it reads the cache
    assert tokenizer_workers(0) == 1 and tokenizer_workers(3) == 3


def test_preference_pairs_tokenized_in_workers_are_the_same(tok):
    from finetune.builtin import preference_rows
    from finetune.data import ROWS_PER_WORKER
    from finetune.pairs import encode_pairs

    rows = preference_rows("train")[:2 * ROWS_PER_WORKER]
    one, one_stats = encode_pairs(rows, "mem", tok, 48, 0, progress=False)
    two, two_stats = encode_pairs(rows, "mem", tok, 48, 0, progress=False, workers=2)
    assert two.to_dict() == one.to_dict() and two_stats == one_stats


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_data(tok, **data):
    from finetune.config import load_recipe
    from finetune.tasks.sft import SFTTask

    task = SFTTask()
    recipe = load_recipe({"data": {"max_length": 64, "cache_tokenized": False, **data},
                          "train": {"eval_generate": 8}, "log": {"progress": False}})
    return task, task.build_data(recipe, tok)


def test_several_sources_are_read_each_in_its_format_and_used_in_order(tok, tmp_path: Path):
    chat = write_jsonl(tmp_path / "chat.jsonl", task_rows("train")[:5])
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": f"Say {i}:", "completion": str(i)} for i in range(3)])
    _, data = sft_data(tok, train=[str(chat), str(plain)])
    alone = [list(encode_dataset(load_rows(str(f), "train"), str(f), "auto", tok, 64, True, False)[0]["input_ids"])
             for f in (chat, plain)]
    assert list(data.train["input_ids"]) == alone[0] + alone[1]
    assert data.train_lengths == [len(ids) for ids in alone[0] + alone[1]]
    # a bad row is named by its own file and line, not by its place in the mixture
    write_jsonl(plain, [{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "c"}])
    with pytest.raises(DataError, match=rf"^{plain}: line 2: expected 'prompt' to be a string"):
        sft_data(tok, train=[str(chat), str(plain)])


def test_eval_fraction_holds_out_part_of_every_source_and_generation_spans_them(tok, tmp_path: Path, caplog):
    import logging

    a = write_jsonl(tmp_path / "a.jsonl", task_rows("train")[:20])
    b = write_jsonl(tmp_path / "b.jsonl", task_rows("train")[20:30])
    with caplog.at_level(logging.INFO, logger="finetune"):
        task, data = sft_data(tok, train=[str(a), str(b)], eval_fraction=0.2)
    assert (len(data.train), len(data.eval)) == (24, 6)  # 16 + 8 kept, 4 + 2 held out
    assert f"data.train: {a} 16 rows, {b} 8 rows" in caplog.text
    assert f"data.eval: {a} (held-out 0.2) 4 rows, {b} (held-out 0.2) 2 rows" in caplog.text
    held = list(data.eval["input_ids"])
    rows_a, rows_b = task_rows("train")[:20], task_rows("train")[20:30]
    from finetune.data import holdout_indices

    held_rows = [rows[i] for rows in (rows_a, rows_b) for i in holdout_indices(len(rows), 0.2, 42)[1]]
    expected = [encode_row(r, "chat", tok, 64, True, "")["input_ids"] for r in held_rows]
    assert held == expected
    assert len(task.examples) == 6  # eval_generate=8 asks for more than the first source holds
    assert "also trained on" not in caplog.text
    _, data = sft_data(tok, train=[str(a), str(b)], eval=[str(b), str(a)])
    assert len(data.eval) == 30 and list(data.eval["input_ids"])[:10] == list(data.train["input_ids"])[20:]
    # evaluating on a training file measures memorisation: said once, naming it
    (said,) = [r.getMessage() for r in caplog.records if "also trained on" in r.getMessage()]
    assert said.startswith(f"data.eval: {b} is also trained on, so its scores measure memorisation")


def test_a_builtin_or_hub_source_is_the_same_rows_only_in_the_same_split(tok, caplog):
    sft_data(tok, train="builtin:tasks", eval="builtin:tasks")  # train and test splits
    assert "also trained on" not in caplog.text
    sft_data(tok, train="builtin:tasks", eval="builtin:tasks", eval_split="train")
    assert "data.eval: builtin:tasks is also trained on" in caplog.text


def test_rows_are_named_by_their_place_in_the_file_in_a_split_too(tok, tmp_path: Path, caplog):
    """Either part of an eval_fraction split is a subset: a bad row there is still named as it is in the file
    (row 15 of the file was reported as row 12); a JSON lines file's rows by line, blank lines counted; other
    sources' by row from 0."""
    from finetune.data import holdout_indices
    from finetune.pairs import build_pair_data

    kept, held = holdout_indices(20, 0.2, 42)
    rows = [{"prompt": f"Say {i}:", "completion": str(i)} for i in range(20)]
    for number in (kept[-1], held[-1]):  # the last of each part: its place there differs from its number
        bad = [dict(r, completion=5) if i == number else r for i, r in enumerate(rows)]
        path = tmp_path / "bad.jsonl"
        path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in bad))  # a blank first line
        with pytest.raises(DataError, match=rf"^{path}( \(held-out 0.2\))?: line {number + 2}: expected 'completion'"):
            sft_data(tok, train=str(path), eval_fraction=0.2)
        parquet = tmp_path / "bad.parquet"
        chats = [{"messages": [{"role": "user", "content": None if i == number else r["prompt"]},
                               {"role": "assistant", "content": r["completion"]}]} for i, r in enumerate(rows)]
        datasets.Dataset.from_list(chats).to_parquet(str(parquet))
        with pytest.raises(DataError, match=rf"^{parquet}( \(held-out 0.2\))?: row {number}: expected messages"):
            sft_data(tok, train=str(parquet), eval_fraction=0.2)
    # a row dropped for having nothing to train on, in the held-out part
    empty = write_jsonl(tmp_path / "empty.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}]} if i == held[-1] else
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for i, r in enumerate(rows)])
    sft_data(tok, train=str(empty), eval_fraction=0.2)
    assert f"(no assistant message; first: line {held[-1] + 1})" in caplog.text
    # preference pairs too
    pairs = [{"prompt": f"Q{i}", "chosen": " yes", "rejected": " no"} for i in range(20)]
    pairs[held[-1]]["chosen"] = ["not", "a", "string"]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    from finetune.config import load_recipe

    recipe = load_recipe({"task": "dpo", "data": {"train": str(path), "eval_fraction": 0.2, "max_length": 64,
                                                  "cache_tokenized": False}, "log": {"progress": False}})
    with pytest.raises(DataError, match=rf"^{path} \(held-out 0.2\): line {held[-1] + 1}"):
        build_pair_data(recipe, tok, False)


def test_preference_sources_number_their_pairs_across_files_and_splits(tok, tmp_path: Path):
    from finetune.builtin import preference_rows
    from finetune.config import load_recipe
    from finetune.pairs import build_pair_data

    rows = preference_rows("train")
    a, b = write_jsonl(tmp_path / "a.jsonl", rows[:6]), write_jsonl(tmp_path / "b.jsonl", rows[6:10])
    recipe = load_recipe({"task": "dpo", "data": {"train": [str(a), str(b)], "eval": [str(b)], "max_length": 64,
                                                   "cache_tokenized": False}})
    train, evals, _, _ = build_pair_data(recipe, tok, progress=False)
    assert list(train["uid"]) == list(range(10)) and list(evals["uid"]) == list(range(10, 14))
    assert list(evals["chosen"]) == list(train["chosen"])[6:]


def test_columns_are_renamed_to_the_names_read_in_json_and_parquet_sources(tok, tmp_path: Path):
    plain = [{"prompt": f"What is {i} + 3?", "completion": str(i + 3)} for i in range(6)]
    reference = list(sft_data(tok, train=str(write_jsonl(tmp_path / "plain.jsonl", plain)))[1].train["input_ids"])
    own = [{"question": r["prompt"], "answer": r["completion"], "id": i} for i, r in enumerate(plain)]
    qa = write_jsonl(tmp_path / "qa.jsonl", own)
    datasets.Dataset.from_list(own).to_parquet(str(tmp_path / "qa.parquet"))
    columns = {"question": "prompt", "answer": "completion"}
    for source in (qa, tmp_path / "qa.parquet"):
        with pytest.raises(DataError, match=r"cannot tell the format .* \(data.columns can rename yours\)$"):
            sft_data(tok, train=str(source))
        assert list(sft_data(tok, train=str(source), columns=columns)[1].train["input_ids"]) == reference
    # a name only one source has is renamed there; the chat source beside it is read as before
    chat = write_jsonl(tmp_path / "chat.jsonl", task_rows("train")[:3])
    mixed = sft_data(tok, train=[str(chat), str(qa)], columns=columns)[1].train["input_ids"]
    assert list(mixed)[3:] == reference


def test_columns_that_clash_or_match_no_source_are_named(tok, tmp_path: Path):
    from finetune.config import ConfigError, load_recipe

    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}, {"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"^data.columns: no data source has a column 'questoin' \(they have "
                                        r"\['answer', 'question'\]\)"):
        sft_data(tok, train=str(qa), columns={"questoin": "prompt"})
    both = write_jsonl(tmp_path / "both.jsonl", [{"text": "a", "question": "q"}, {"prompt": "p", "question": "q"}])
    with pytest.raises(DataError, match=rf"^{both}: line 2: data.columns renames 'question' to 'prompt', a column "
                                        "it already has"):
        sft_data(tok, train=str(both), columns={"question": "prompt", "answer": "completion"})
    datasets.Dataset.from_list([{"question": "q", "prompt": "p"}]).to_parquet(str(tmp_path / "both.parquet"))
    with pytest.raises(DataError, match="both.parquet: data.columns renames 'question' to 'prompt'"):
        sft_data(tok, train=str(tmp_path / "both.parquet"), columns={"question": "prompt"})
    with pytest.raises(ConfigError, match="data.columns: two columns renamed to the same name 'prompt'"):
        load_recipe({"data": {"columns": {"question": "prompt", "q2": "prompt"}}})
    with pytest.raises(ConfigError, match=r"data.columns: expected a mapping of names to names, got \['a'\]"):
        load_recipe({"data": {"columns": ["a"]}})
    with pytest.raises(ConfigError, match=r"data.columns.question: expected a string, got 3"):
        load_recipe({"data": {"columns": {"question": 3}}})


def test_preference_columns_are_renamed_and_may_swap(tok, tmp_path: Path):
    from finetune.builtin import preference_rows
    from finetune.config import load_recipe
    from finetune.pairs import build_pair_data

    def pairs(source: Path, columns: dict) -> dict:
        recipe = load_recipe({"task": "rm", "data": {"train": str(source), "columns": columns, "max_length": 64,
                                                      "cache_tokenized": False}})
        return build_pair_data(recipe, tok, progress=False)[0]

    rows = [{"prompt": r["chosen"][0]["content"], "chosen": r["chosen"][1]["content"],
             "rejected": r["rejected"][1]["content"]} for r in preference_rows("train")[:5]]
    reference = pairs(write_jsonl(tmp_path / "pairs.jsonl", rows), {})
    own = write_jsonl(tmp_path / "own.jsonl", [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}
                                                for r in rows])
    renamed = pairs(own, {"question": "prompt", "good": "chosen", "bad": "rejected"})
    assert list(renamed["chosen"]) == list(reference["chosen"])
    assert list(renamed["rejected"]) == list(reference["rejected"])
    swapped = pairs(tmp_path / "pairs.jsonl", {"chosen": "rejected", "rejected": "chosen"})
    assert list(swapped["chosen"]) == list(reference["rejected"])


def test_resampled_takes_whole_copies_then_a_seeded_subset():
    from collections import Counter

    from finetune.data import resampled

    assert resampled(10, 1.0, 0) == list(range(10))
    twice_and_half = Counter(resampled(10, 2.5, 0))
    assert sorted(twice_and_half) == list(range(10)) and sorted(Counter(twice_and_half.values()).items()) == [
        (2, 5), (3, 5)]
    part = resampled(10, 0.3, 0)
    assert len(part) == len(set(part)) == 3 and part == sorted(part)
    assert resampled(10, 0.3, 0) == part and any(resampled(10, 0.3, s) != part for s in range(1, 5))


def test_a_mapping_of_sources_to_fractions_mixes_them(tok, tmp_path: Path, caplog):
    import logging

    from finetune.config import ConfigError, load_recipe

    chat = write_jsonl(tmp_path / "chat.jsonl", task_rows("train")[:8])
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": f"Say {i}:", "completion": str(i)} for i in range(3)])
    alone = [list(encode_dataset(load_rows(str(f), "train"), str(f), "auto", tok, 64, True, False)[0]["input_ids"])
             for f in (chat, plain)]
    with caplog.at_level(logging.INFO, logger="finetune"):
        _, data = sft_data(tok, train={str(chat): 0.5, str(plain): 2})
    assert f"data.train: {chat} 8 rows x 0.5, {plain} 3 rows x 2" in caplog.text
    ids = list(data.train["input_ids"])
    assert len(ids) == 4 + 6 and ids[4:] == alone[1] * 2
    assert all(row in alone[0] for row in ids[:4]) and len({tuple(r) for r in ids[:4]}) == 4
    assert data.train_lengths == [len(r) for r in ids]
    # held-out rows are taken first and never resampled
    with caplog.at_level(logging.INFO, logger="finetune"):
        _, held = sft_data(tok, train={str(chat): 3}, eval_fraction=0.25)
    assert (len(held.train), len(held.eval)) == (18, 2)
    assert f"data.train: {chat} 6 rows x 3\n" in caplog.text  # one source said too, when it is resampled
    for bad, message in (({str(chat): 0}, r"data.train.\S+chat.jsonl: expected a value > 0, got 0.0"),
                         ({str(chat): "x"}, "data.train: expected a string, a list of strings or a mapping of "
                                            "names to numbers"),
                         ({}, "data.train: expected a data source or a non-empty list of them")):
        with pytest.raises(ConfigError, match=message):
            load_recipe({"data": {"train": bad}})


def test_a_pair_taken_twice_keeps_its_uid(tok, tmp_path: Path):
    from finetune.builtin import preference_rows
    from finetune.config import load_recipe
    from finetune.pairs import build_pair_data

    a = write_jsonl(tmp_path / "a.jsonl", preference_rows("train")[:4])
    recipe = load_recipe({"task": "dpo", "data": {"train": {str(a): 2}, "eval": str(a), "max_length": 64,
                                                   "cache_tokenized": False}})
    train, evals, _, _ = build_pair_data(recipe, tok, progress=False)
    assert list(train["uid"]) == [0, 1, 2, 3] * 2 and list(train["chosen"])[:4] == list(train["chosen"])[4:]
    assert sorted(evals["uid"]) == [4, 5, 6, 7]  # after the train pairs' uids


def test_held_out_sources_are_named_for_their_metrics():
    from types import SimpleNamespace

    from finetune.data import eval_sources

    d = SimpleNamespace(eval=["data/chat.jsonl", "builtin:tasks", "openai/gsm8k:main", "x/chat.json", "/a/My Set/"],
                        train="t.jsonl")
    assert eval_sources(d, [[0]] * 2 + [[0, 1]] * 3) == [("chat", 1), ("tasks", 1), ("gsm8k", 2), ("chat_4", 2),
                                                         ("my_set", 2)]
    held_out = SimpleNamespace(eval=None, train={"a.jsonl": 1.0, "b.parquet": 0.5})  # data.eval_fraction's parts
    assert eval_sources(held_out, [[0], [0]]) == [("a", 1), ("b", 1)]
    assert eval_sources(d, [[0]]) is None  # one source: only eval_loss and the rest


def test_a_template_that_fails_on_a_row_is_one_line_naming_it(tok, tmp_path: Path, capsys):
    """Gemma's template raises "System role not supported" on a system message: said for the row, as for a
    template that cannot render it or is not Jinja, in every kind of row and on the command line (exit code 2)."""
    from conftest import ROOT

    from finetune.cli import main
    from finetune.pairs import encode_pair

    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    refused = r"^x: the chat template failed on this row: System role not supported$"
    with pytest.raises(DataError, match=refused):
        encode_row({"messages": CONVO}, "chat", tok, 64, True, "x")
    with pytest.raises(DataError, match=refused):
        encode_row({"prompt": CONVO[:2], "completion": CONVO[2:3]}, "prompt_completion", tok, 64, True, "x")
    with pytest.raises(DataError, match=refused):
        encode_pair({"prompt": CONVO[:2], "chosen": CONVO[2:3], "rejected": CONVO[4:5]}, tok, 64, 32, "x")
    assert encode_row({"messages": CONVO[1:3]}, "chat", tok, 64, True, "x")["input_ids"]  # without the system turn
    tok.chat_template = "{% for m in messages %}{{ m.content.upper() }}{% endfor %}{{ date.today }}"
    with pytest.raises(DataError, match=r"^x: the chat template failed on this row: 'date' is undefined$"):
        encode_row({"messages": CONVO}, "chat", tok, 64, True, "x")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }"
    with pytest.raises(DataError, match=r"^the chat template is not valid Jinja \(line 1: unexpected '}'\)"):
        encode_row({"messages": CONVO}, "chat", tok, 64, True, "x")

    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": CONVO}) + "\n")
    template = tmp_path / "gemma.jinja"
    template.write_text("{{ raise_exception('System role not supported') }}")
    assert main(["sft", str(ROOT / "recipes/tiny_sft.yaml"), f"data.train={train}", f"model.chat_template={template}",
                 "data.eval=null", f"output_dir={tmp_path / 'run'}", "log.progress=false"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"finetune: error: {train}: line 1: the chat template failed on this row: System role not supported"


REASONING_CHAT = [{"role": "user", "content": "What is 2 + 3?"},
                  {"role": "assistant", "content": "5", "reasoning_content": "2 + 3 = 5"},
                  {"role": "user", "content": "And 4 + 4?"},
                  {"role": "assistant", "content": "8", "reasoning_content": "4 + 4 = 8"}]


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_real_templates_without_markers_train_as_trl_trains_them(tiny_dir, tmp_path: Path, name: str):
    """Real models' templates have no {% generation %} markers, and Qwen3's renders an earlier answer without its
    reasoning once another turn follows, so no answer's span can be found by rendering. Chat rows then train with
    TRL's training version of the template, as TRL's SFTTrainer does: the same ids and assistant labels; with
    data.completion_only_loss false, the template's own rendering."""
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()
    tok.bos_token = tok.eos_token  # Llama 3's template starts with one; the tiny tokenizer has none of its own
    rows = [{"messages": REASONING_CHAT}, {"messages": REASONING_CHAT[:2]}]
    args = SFTConfig(output_dir=str(tmp_path), max_length=1024, assistant_only_loss=True, report_to="none",
                     bf16=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    ours, _ = encode_dataset(rows, "mem", "chat", tok, 1024, True, progress=False)
    assert ours["input_ids"] == trainer.train_dataset["input_ids"]
    assert ours["labels"] == trainer.train_dataset["labels"]
    trained = tok.decode([t for t in ours["labels"][0] if t != IGNORE_INDEX])
    assert "5" in trained and "8" in trained and "4 + 4?" not in trained
    if name == "qwen3":
        assert "2 + 3 = 5" in trained  # the earlier answer's reasoning, which the template's own rendering drops
        with pytest.raises(DataError, match="renders earlier turns differently"):
            chat_ids_and_mask(tok, REASONING_CHAT, "x")  # what rendering alone can do with it
    everything = encode_row(rows[0], "chat", tok, 1024, False, "x")
    assert everything["input_ids"] == tok.apply_chat_template(REASONING_CHAT, tokenize=True,
                                                              return_dict=True)["input_ids"]


def test_a_marked_answer_span_without_its_end_token_is_warned_about(tok, caplog):
    """A {% generation %} span that stops before the answer's <|im_end|> would never train the model to stop (TRL's
    check, as its SFTTrainer warns); the builtin template's span holds it, as does a span found by rendering."""
    import logging

    rows = [{"messages": CONVO}]
    unmarked = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    cut = CHAT_TEMPLATE.replace("{% generation %}{{- message['content'] + '<|im_end|>\n' -}}{% endgeneration %}",
                                "{% generation %}{{- message['content'] -}}{% endgeneration %}{{- '<|im_end|>\n' -}}")
    said = {}
    for name, template in (("builtin", CHAT_TEMPLATE), ("unmarked", unmarked), ("cut", cut)):
        tok.chat_template = template
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="finetune"):
            encode_dataset(rows, name, "chat", tok, 64, True, progress=False)
        said[name] = [r.getMessage() for r in caplog.records if "would not learn to stop" in r.getMessage()]
    assert cut != CHAT_TEMPLATE and said["builtin"] == said["unmarked"] == []
    assert said["cut"] == ["cut: the chat template's {% generation %} span of an answer leaves out its end-of-turn "
                           "token, so the model would not learn to stop; put that token inside the span, or set "
                           "data.completion_only_loss: false"]


def write_delimited(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_and_tsv_rows_train_as_the_same_rows_in_json_lines(tok, tmp_path: Path):
    """Cells are text, as written: an answer of "19" stays text (datasets' CSV reader would make it a number),
    a quoted cell may span lines and hold the delimiter; chat columns hold JSON text."""
    plain = [{"prompt": f"What is {i} + 3?\nSay it, then stop.", "completion": str(i + 3)} for i in range(6)]
    plain[2]["prompt"] = 'Add "2", then 3, and 4:'
    reference = list(sft_data(tok, train=str(write_jsonl(tmp_path / "plain.jsonl", plain)))[1].train["input_ids"])
    for name, delimiter in (("plain.csv", ","), ("plain.tsv", "\t")):
        path = write_delimited(tmp_path / name, plain, delimiter)
        assert "\n" in load_rows(str(path), "train")[0]["prompt"]
        assert list(sft_data(tok, train=str(path))[1].train["input_ids"]) == reference
    chats = task_rows("train")[:5]
    reference = list(sft_data(tok, train=str(write_jsonl(tmp_path / "chat.jsonl", chats)))[1].train["input_ids"])
    path = write_delimited(tmp_path / "chat.csv", [{"messages": json.dumps(r["messages"])} for r in chats])
    assert list(sft_data(tok, train=str(path))[1].train["input_ids"]) == reference


def test_a_directory_of_csv_files_is_read_as_text_too(tok, tmp_path: Path):
    """datasets reads a directory's files and finds its splits; its CSV reader would make a column of numbers
    numbers (and the rows then fail as "expected a string"): the cells stay text, as in a CSV file."""
    plain = [{"prompt": f"What is {i} + 3?", "completion": str(i + 3), "input": ""} for i in range(8)]
    reference = list(sft_data(tok, train=str(write_jsonl(tmp_path / "plain.jsonl", plain[:6])))[1].train["input_ids"])
    folder = tmp_path / "repo"
    folder.mkdir()
    write_delimited(folder / "train.csv", plain[:6])
    write_delimited(folder / "test.csv", plain[6:])
    (folder / "README.md").write_text("# a dataset card\n")
    assert load_rows(str(folder), "test") == plain[6:]
    assert list(sft_data(tok, train=str(folder))[1].train["input_ids"]) == reference
    from finetune.data import text_columns

    write_delimited(folder / "test.csv", [{"question": "What is 1 + 1?", "answer": "2"}])  # other columns
    with pytest.raises(DataError, match=r"repo: its CSV files have different columns \(test.csv: \['question', "
                                        r"'answer'\], train.csv: \['prompt', 'completion', 'input'\]\); expected "
                                        r"one header in all of them$"):
        load_rows(str(folder), "train")
    write_delimited(folder / "test.csv", plain[6:])
    (folder / "extra.jsonl").write_text("")  # not all CSV: left to datasets' own reading
    assert text_columns(folder) is None


def test_csv_rows_are_named_by_the_line_they_start_on(tok, tmp_path: Path):
    rows = [{"prompt": f"Say {i}:\n(two lines)", "completion": str(i)} for i in range(4)]
    path = write_delimited(tmp_path / "d.csv", rows)
    text = path.read_text()
    path.write_text("\n" + text)  # a blank first line; each row then starts on line 3 + 2 i (a 2-line cell)
    assert load_rows(str(path), "train").numbering.numbers == [3, 5, 7, 9]
    path.write_text(text + 'Say 9:,9,extra\n')
    with pytest.raises(DataError, match=rf"^{path}: line 10: 3 cells where the header \(line 1\) names 2 columns"):
        load_rows(str(path), "train")
    path.write_text('prompt,completion\n"Say 1:,1\nSay 2:,2\n')  # a quote left open runs to the end
    with pytest.raises(DataError, match=rf"^{path}: line 2: 1 cells where the header"):
        load_rows(str(path), "train")
    for header, says in (("prompt,prompt", "'prompt' twice"), ("prompt,", "a column without a name")):
        path.write_text(f"{header}\nSay 1:,1\n")
        with pytest.raises(DataError, match=rf"^{path}: line 1: expected a header of distinct column names, got "
                                            f"{says}$"):
            load_rows(str(path), "train")
    path.write_text("messages\n[{\"role\": \"user\"\n")
    with pytest.raises(DataError, match=rf"^{path}: line 2: expected 'messages' to be a list as JSON text"):
        sft_data(tok, train=str(path))
    (tmp_path / "latin1.csv").write_bytes("text\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv: not UTF-8 text \(byte 8\); expected CSV$"):
        load_rows(str(tmp_path / "latin1.csv"), "train")
    (tmp_path / "d.xlsx").write_text("")
    with pytest.raises(DataError, match=r"d.xlsx: expected a .jsonl, .json, .parquet, .csv or .tsv file$"):
        load_rows(str(tmp_path / "d.xlsx"), "train")


def test_csv_preference_pairs_read_margins_and_kto_labels(tok, tmp_path: Path):
    from finetune.builtin import preference_rows
    from finetune.config import load_recipe
    from finetune.pairs import build_pair_data

    def pairs(path: Path, **dpo):
        recipe = load_recipe({"task": "dpo", "dpo": dpo, "data": {"train": str(path), "max_length": 64,
                                                                  "cache_tokenized": False}})
        return build_pair_data(recipe, tok, False)[0]

    rows = [{"prompt": r["chosen"][0]["content"], "chosen": " " + r["chosen"][1]["content"],
             "rejected": " " + r["rejected"][1]["content"], "margin": i / 4}
            for i, r in enumerate(preference_rows("train")[:6])]  # text pairs: a CSV cell is text
    reference = pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    got = pairs(write_delimited(tmp_path / "p.csv", [dict(r, margin=str(r["margin"])) for r in rows]))
    for key in ("chosen", "rejected", "margin"):
        assert list(got[key]) == list(reference[key])
    rows[3]["margin"] = "a lot"
    with pytest.raises(DataError, match=r"p.csv: line 5: expected 'margin' to be a number, got 'a lot'$"):
        pairs(write_delimited(tmp_path / "p.csv", rows))
    rows[3]["margin"] = ""  # an empty cell: no margin, as a JSON row without one
    assert list(pairs(write_delimited(tmp_path / "p.csv", rows))["margin"]) == [0.0, 0.25, 0.5, 0.0, 1.0, 1.25]
    unpaired = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0} for i, r in enumerate(rows)]
    reference = pairs(write_jsonl(tmp_path / "k.jsonl", unpaired), loss_type="kto")
    cells = [dict(r, label=["True", "0", "yes", "false", "1", "no"][i]) for i, r in enumerate(unpaired)]
    got = pairs(write_delimited(tmp_path / "k.csv", cells), loss_type="kto")
    assert list(got["label"]) == list(reference["label"]) == [True, False, True, False, True, False]
    assert list(got["chosen"]) == list(reference["chosen"])
    cells[1]["label"] = "maybe"
    with pytest.raises(DataError, match=r"k.csv: line 3: expected 'label' to be true or false, got 'maybe'$"):
        pairs(write_delimited(tmp_path / "k.csv", cells), loss_type="kto")


def test_token_columns_hold_the_rows_as_lists_would_across_chunks():
    import random

    from finetune.data import TokenColumns

    rng = random.Random(0)
    rows = [{"ids": [rng.randrange(50000) for _ in range(rng.randrange(0, 40))], "margin": rng.random(),
             "label": rng.random() < 0.5, "uid": i} for i in range(1000)]
    by_rows, by_tokens = TokenColumns("ids"), TokenColumns("ids")
    by_rows.CHUNK_ROWS = 64  # a chunk every 64 rows: 15 and a part
    by_tokens.CHUNK_TOKENS = 300  # or once 300 tokens wait: one every 15 rows or so
    for row in rows:
        by_rows.append(**row)
        by_tokens.append(**row)
    expected = datasets.Dataset.from_list(rows)
    for columns in (by_rows, by_tokens):
        assert len(columns) == 1000
        got = columns.dataset()
        assert got.to_list() == expected.to_list()
        assert str(got.features["ids"].feature) == "Value('int32')"
    assert [len(chunk) for chunk in by_rows.chunks["ids"]] == [64] * 15 + [40]
    # lengths by Arrow, in the order and selection of a resampled dataset (an indices mapping)
    from finetune.data import list_lengths

    picked = by_rows.dataset().select([5, 3, 3, 999, 0])
    assert list_lengths(picked, "ids") == [len(rows[i]["ids"]) for i in (5, 3, 3, 999, 0)]
    tokens = [len(chunk.values) for chunk in by_tokens.chunks["ids"]]  # each closed by the row that reached 300
    assert all(300 <= n < 300 + 40 for n in tokens[:-1]) and sum(tokens) == sum(len(r["ids"]) for r in rows)
