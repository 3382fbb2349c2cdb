"""Chat rows: their messages checked, rendered by the chat template (with the row's tools and the template's
variables), and which tokens are the assistant's, for the loss on them alone."""

from __future__ import annotations

import functools
import inspect
import json
import logging
from typing import Any

from finetune.errors import DataError

logger = logging.getLogger("finetune")


def check_str(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: expected {what} to be a string, got {type(value).__name__}")
    return value


def _text_parts(parts: list, what: str, where: str) -> str:
    """Content given as parts ([{"type": "text", "text": ...}, ...], the OpenAI and multimodal layout) as the
    text they make together, which every chat template renders; other parts have no place in a text model."""
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = repr(part.get("type")) if isinstance(part, dict) else type(part).__name__
            raise DataError(f"{where}: {what}[{j}] is a {kind} part; expected text parts "
                            "({\"type\": \"text\", \"text\": ...}): a language model reads text only")
        texts.append(part["text"])
    return "".join(texts)


def check_messages(messages: Any, where: str, weights: bool = False) -> list[dict[str, Any]]:
    """Chat messages: each a `role` and a text `content` (text parts are joined into it); an assistant's tool
    calls (`tool_calls`, a list) may stand instead of the content, as in the OpenAI format chat templates render.
    With `weights` (chat rows), an assistant message's `weight` 0 leaves it untrained (OpenAI's fine-tuning
    format); elsewhere a weight 0 is refused rather than ignored."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected 'messages' to be a non-empty list of {{role, content}}")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
            raise DataError(f"{where}: messages[{i}] must have 'role' and 'content'")
        weight = m.get("weight")
        if weight is not None and (weight not in (0, 1) or (weight == 0 and not weights)
                                   or (m["role"] != "assistant" and weight != 1)):
            raise DataError(f"{where}: messages[{i}].weight is {weight!r}; expected 0 or 1 on an assistant message "
                            "(OpenAI's fine-tuning format), and 0 only in chat rows (messages or conversations)")
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise DataError(f"{where}: expected messages[{i}].tool_calls to be a list, got {type(calls).__name__}")
        if isinstance(m.get("content"), list):
            m = {**m, "content": _text_parts(m["content"], f"messages[{i}].content", where)}
        elif calls is None or m.get("content") is not None:
            check_str(m.get("content"), f"messages[{i}].content", where)
        checked.append(m)
    return checked


def row_tools(row: dict[str, Any], where: str) -> list[dict] | None:
    """A chat row's `tools` (function schemas the chat template lists for the model), or None; hub datasets often
    hold them as JSON text, which is parsed (as TRL does)."""
    tools = row.get("tools")
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: 'tools' is text but not JSON ({e.msg}); expected a list of function "
                            "schemas") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: expected 'tools' to be a list of function schemas (objects), got "
                        f"{type(tools).__name__}")
    return tools


CHAT_FORMATS = ("chat", "sharegpt")  # the formats whose rows are messages, rendered by the chat template
# ShareGPT's speaker names (`from`), as axolotl and LLaMA-Factory read them, to chat roles; LLaMA-Factory's
# `function_call` (the call as JSON text) becomes an assistant's tool call, its `observation` the tool's answer
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}


def sharegpt_messages(turns: Any, where: str) -> list[dict[str, Any]]:
    """A ShareGPT row's `conversations` ([{from, value}, ...]) as chat messages."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: expected 'conversations' to be a non-empty list of {{from, value}}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{i}] must have 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise DataError(f"{where}: conversations[{i}].from is {turn['from']!r}; expected one of "
                            f"{', '.join(SHAREGPT_ROLES)}")
        if turn["from"] == "function_call":
            try:
                call = json.loads(check_str(turn["value"], f"conversations[{i}].value", where))
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: conversations[{i}] is a function_call whose value is not JSON "
                                f"({e.msg}); expected {{\"name\": ..., \"arguments\": ...}}") from None
            calls = call if isinstance(call, list) else [call]  # LLaMA-Factory: one call, or a list of them
            if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
                raise DataError(f"{where}: conversations[{i}] is a function_call; expected its value to be "
                                f"{{\"name\": ..., \"arguments\": ...}} (or a list of them), got "
                                f"{turn['value'][:60]!r}")
            messages.append({"role": role, "content": None,
                             "tool_calls": [{"type": "function", "function": c} for c in calls]})
        else:
            # axolotl's ShareGPT turns may carry a weight, as OpenAI's messages do
            weight = {"weight": turn["weight"]} if turn.get("weight") is not None else {}
            messages.append({"role": role, "content": turn["value"], **weight})
    return messages


def row_messages(row: dict[str, Any], fmt: str, where: str) -> list[dict[str, str]]:
    """The checked chat messages of a `chat` or `sharegpt` row; a ShareGPT row's `system` field (LLaMA-Factory's
    system prompt) is its first message."""
    if fmt == "chat":
        return check_messages(row["messages"], where, weights=True)
    messages = sharegpt_messages(row["conversations"], where)
    system = row.get("system")
    if system:
        check_str(system, "'system'", where)
        if messages[0]["role"] == "system" and messages[0]["content"] != system:
            raise DataError(f"{where}: a 'system' field beside a conversation that begins with another system turn; "
                            "expected one system prompt")
        messages = messages if messages[0]["role"] == "system" else [{"role": "system", "content": system}, *messages]
    return check_messages(messages, where, weights=True)


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "generation" in template and "endgeneration" in template


_TRAINING_TEMPLATES: dict[str, str | None] = {}


def training_template(tokenizer: Any) -> str | None:
    """For a loss on assistant turns only, where the tokenizer's template has no `{% generation %}` markers: TRL's
    training version of it (`get_training_chat_template`: the same turns, with markers, and earlier turns rendered
    as when they were last, e.g. Qwen3's reasoning), as TRL's SFTTrainer trains with; None for a template TRL has
    none for (its assistant turns are then found by rendering)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or has_generation_markers(template):
        return None
    if template not in _TRAINING_TEMPLATES:
        import jinja2
        from trl.chat_template_utils import get_training_chat_template

        try:
            _TRAINING_TEMPLATES[template] = get_training_chat_template(tokenizer)
        except (ValueError, TypeError, jinja2.TemplateError):  # not a template TRL knows
            _TRAINING_TEMPLATES[template] = None
    return _TRAINING_TEMPLATES[template]


@functools.cache
def template_parameters(tokenizer_class: type) -> frozenset[str]:
    """The names `apply_chat_template` takes itself: a chat template variable by one of them never reaches it."""
    return frozenset(inspect.signature(tokenizer_class.apply_chat_template).parameters) | {"messages"}


def check_template_kwargs(tokenizer: Any, kwargs: dict[str, Any] | None, what: str) -> None:
    """Variables for the chat template that reach it: none is one of `apply_chat_template`'s own arguments, and
    the template reads each that is set (one it never reads would be dropped without a word). `what` prefixes a
    variable's name in errors."""
    template = str(getattr(tokenizer, "chat_template", None) or "")
    for name, value in (kwargs or {}).items():
        if name in template_parameters(type(tokenizer)):
            raise DataError(f"{what}{name}: an argument of apply_chat_template, not a template variable")
        if value is not None and template and name not in template:
            raise DataError(f"{what}{name}: the chat template never reads {name}")


def chat_args(row: dict[str, Any], where: str, tokenizer: Any, defaults: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """What the chat template renders a row with besides its messages: the row's `tools`, and variables for the
    template (`enable_thinking`, ...): the recipe's `data.chat_template_kwargs`, under the row's own
    `chat_template_kwargs` (a mapping, or its JSON text), as TRL reads them."""
    own = row.get("chat_template_kwargs")
    if isinstance(own, str) and own:
        try:
            own = json.loads(own)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: 'chat_template_kwargs' is text but not JSON ({e.msg}); expected a mapping of "
                            "template variables") from None
    if own is not None and own != "" and not isinstance(own, dict):
        raise DataError(f"{where}: expected 'chat_template_kwargs' to be a mapping of template variables, got "
                        f"{type(own).__name__}")
    check_template_kwargs(tokenizer, defaults, "data.chat_template_kwargs.")
    check_template_kwargs(tokenizer, own, f"{where}: chat_template_kwargs.")
    return {"tools": row_tools(row, where), **(defaults or {}), **(own or {})}


def require_chat_template(tokenizer: Any, where: str, rows: str, messages: list[dict[str, Any]] = (),
                          args: dict[str, Any] | None = None) -> None:
    """A chat template that renders these messages with these `chat_args`: one that never mentions tool calls or
    tools would drop them without a word (a tool call's empty content renders as "None")."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise DataError(f"{where}: {rows} need a tokenizer with a chat template, and this tokenizer has none; "
                        "set model.chat_template (e.g. chatml)")
    args = args or {}
    calls = any(m.get("tool_calls") for m in messages)
    for name, present in (("tool_calls", calls), ("tools", bool(args.get("tools")))):
        if present and name not in str(template):
            raise DataError(f"{where}: the row has {name}, and the chat template never renders {name}; use a "
                            "model whose template does, or a model.chat_template that does")


def check_marked_template(tokenizer: Any, source: str) -> None:
    """Say which template chat rows with an assistant-only loss render with, where it is TRL's training version,
    and warn where its {% generation %} span leaves an answer's end-of-turn token out of the loss: the model
    would never learn to stop (TRL's check; a span found by rendering holds the end token by construction)."""
    from_trl = training_template(tokenizer)
    marked = from_trl or (tokenizer.chat_template if has_generation_markers(tokenizer.chat_template) else None)
    if from_trl:
        logger.info("%s: chat rows rendered with TRL's training version of the chat template (get_training_chat_"
                    "template: generation markers for the assistant-only loss), as TRL's SFTTrainer renders them",
                    source)
    if marked:
        from trl.chat_template_utils import is_chat_template_stop_token_trained

        if not is_chat_template_stop_token_trained(tokenizer, chat_template=marked):
            logger.warning("%s: the chat template's {%% generation %%} span of an answer leaves out its end-of-turn "
                           "token, so the model would not learn to stop; put that token inside the span, or set "
                           "data.completion_only_loss: false", source)


def apply_template(tokenizer: Any, messages: list[dict[str, Any]], where: str, **kwargs: Any) -> Any:
    """`tokenizer.apply_chat_template`, with the template's own refusal of a row (its `raise_exception`, e.g.
    Gemma's "System role not supported") or failure on it said in one line naming the row."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); fix "
                        "model.chat_template or the tokenizer's") from None
    except jinja2.TemplateError as e:
        raise DataError(f"{where}: the chat template failed on this row: {e}") from None


def chat_ids_and_mask(tokenizer: Any, messages: list[dict[str, str]], where: str = "chat",
                      args: dict[str, Any] | None = None) -> tuple[list, list]:
    """Token ids of a rendered chat and a 0/1 mask of assistant tokens (including each turn's end token).

    Templates with `{% generation %}` markers (the tokenizer's, or `args["chat_template"]`, a
    `training_template`) use transformers' own assistant mask. For templates without them, each assistant turn's
    character span is found by rendering the conversation up to it, and tokens are assigned through the
    tokenizer's offsets.
    """
    args = args or {}
    require_chat_template(tokenizer, where, "chat rows", messages, args)
    answers = [m for m in messages if m["role"] == "assistant"]
    if has_generation_markers(args.get("chat_template") or tokenizer.chat_template):
        out = apply_template(tokenizer, messages, where, tokenize=True, return_dict=True,
                             return_assistant_tokens_mask=True, **args)
        mask = list(out["assistant_masks"])
        if any(m.get("weight") == 0 for m in answers):  # the k-th run of marked tokens is the k-th answer's
            runs = [i for i, bit in enumerate(mask) if bit and (i == 0 or not mask[i - 1])]
            if len(runs) != len(answers):
                raise DataError(f"{where}: a message weight needs each answer's tokens apart, and the chat "
                                f"template's {{% generation %}} spans are {len(runs)} for {len(answers)} answers")
            for start, message in zip(runs, answers, strict=True):
                end = start
                while end < len(mask) and mask[end]:
                    end += 1
                if message.get("weight") == 0:
                    mask[start:end] = [0] * (end - start)
        return list(out["input_ids"]), mask
    text = apply_template(tokenizer, messages, where, tokenize=False, **args)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = apply_template(tokenizer, messages[:i], where, tokenize=False, add_generation_prompt=True,
                                **args) if i else ""
        through = apply_template(tokenizer, messages[: i + 1], where, tokenize=False, **args)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError(f"{where}: the chat template renders earlier turns differently once later turns follow, "
                            "so assistant tokens cannot be located; use a template with {% generation %} markers "
                            "or set data.completion_only_loss: false")
        if message.get("weight") != 0:
            spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def conversational_prompt(row: dict[str, Any], fmt: str, where: str) -> tuple[list, list] | None:
    """The prompt's and the completion's messages of a conversational prompt_completion row (TRL's layout:
    `prompt` the conversation so far, `completion` the assistant's reply); None for text rows."""
    if fmt != "prompt_completion" or not (isinstance(row["prompt"], list) or isinstance(row["completion"], list)):
        return None
    if not (isinstance(row["prompt"], list) and isinstance(row["completion"], list)):
        raise DataError(f"{where}: expected 'prompt' and 'completion' to be both strings or both message lists")
    return (check_messages(row["prompt"], f"{where} (prompt)"),
            check_messages(row["completion"], f"{where} (completion)"))


def render_after_prompt(tokenizer: Any, prompt: list, response: list, where: str, rows: str,
                        args: dict[str, Any] | None = None) -> tuple[str, str]:
    """The chat template's text of `prompt` with its generation prompt, and of prompt + response, which begins
    with it (checked: the response's tokens are what follows). `args`: `chat_args`."""
    args = args or {}
    require_chat_template(tokenizer, where, rows, prompt + response, args)
    head = apply_template(tokenizer, prompt, where, tokenize=False, add_generation_prompt=True, **args)
    text = apply_template(tokenizer, prompt + response, where, tokenize=False, **args)
    if not text.startswith(head):
        raise DataError(f"{where}: the chat template renders the prompt differently once a response follows")
    return head, text


def chat_prompt_completion_ids(tokenizer: Any, prompt: list, completion: list, where: str,
                               args: dict[str, Any] | None = None) -> tuple[list, list]:
    """Token ids of prompt + completion messages rendered by the chat template, and a 0/1 mask of the tokens
    after the prompt with its generation prompt (the completion, as TRL's SFTTrainer masks it)."""
    head, text = render_after_prompt(tokenizer, prompt, completion, where, "conversational prompt/completion rows",
                                     args)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [int(start >= len(head)) for start, _ in enc["offset_mapping"]]
