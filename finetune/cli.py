"""Command line: `finetune {sft,rm,dpo} RECIPE.yaml [key=value ...]` (also through `accelerate launch`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from finetune.config import TASKS, load_recipe, parse_overrides, read_yaml, to_yaml
from finetune.errors import SaidByMainProcess, UserError

EXAMPLES = """examples:
  finetune sft recipes/tiny_sft.yaml
  finetune sft recipes/tiny_lora.yaml train.max_steps=50 output_dir=runs/try
  accelerate launch --config_file accelerate_configs/ddp.yaml finetune sft recipes/llama_lora.yaml
  finetune sft recipes/tiny_sft.yaml --eval-only model.name_or_path=runs/tiny_sft/model
  finetune generate runs/tiny_sft/model "What is 12 + 7?"
  finetune score runs/tiny_rm/model "Reverse: fire star key rain" "rain key star fire" "fire star key rain"
"""


def versions() -> str:
    """finetune's version and those of the libraries it trains with (from package metadata: nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    from finetune import __version__  # also when run from a checkout that is not installed

    libraries = ", ".join(f"{n} {of(n)}" for n in ("torch", "transformers", "accelerate", "peft", "datasets", "trl"))
    return f"finetune {__version__} ({libraries})"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune", description="Fine-tune language models with one Accelerate loop.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=versions(), help="versions, for bug reports")
    commands = (*TASKS, "merge", "generate", "score")
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(commands) + "}")
    helps = {"sft": "supervised fine-tuning (full or LoRA/QLoRA)", "rm": "reward model (Bradley-Terry)",
             "dpo": "direct preference optimisation"}
    for task in TASKS:
        s = sub.add_parser(task, help=helps[task], epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny_sft.yaml")
        s.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                       help="dotted overrides, e.g. train.lr=1e-4")
        s.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
        s.add_argument("--show-rows", type=int, default=0, metavar="N",
                       help="print the first N training rows as the model sees them (the loss is on the text "
                            "inside [[ ]]) and exit")
        s.add_argument("--eval-only", action="store_true",
                       help="evaluate the model (or the checkpoint it would resume from) on the held-out data, "
                            "print the metrics as JSON and exit; nothing is trained or written")
    m = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    m.add_argument("adapter", help="adapter directory (OUTPUT_DIR/model of a LoRA run)")
    m.add_argument("output", help="where to save the merged model")
    m.add_argument("--base", help="base model (default: the one named in adapter_config.json)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it already holds files")
    g = sub.add_parser("generate", help="answer prompts with a trained model (or LoRA adapter)")
    g.add_argument("model", help="a trained model or adapter directory (OUTPUT_DIR/model)")
    g.add_argument("prompts", nargs="*", metavar="prompt", help="prompts to answer; none: one per line of stdin")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy decoding")
    g.add_argument("--raw", action="store_true", help="the prompt as plain text, not a chat turn")
    c = sub.add_parser("score", help="score responses to a prompt with a trained reward model")
    c.add_argument("model", help="a trained reward model or adapter directory (OUTPUT_DIR/model of finetune rm)")
    c.add_argument("prompt", help="what the responses answer (a user turn of the chat template unless --raw)")
    c.add_argument("responses", nargs="+", metavar="response", help="responses to score, one line of output each")
    c.add_argument("--raw", action="store_true",
                   help="prompt and response as plain text (a pair of strings in training), not chat turns")
    for command in (g, c):
        command.add_argument("--template-var", action="append", default=[], metavar="NAME=VALUE",
                             help="a chat template variable, as data.chat_template_kwargs in training (e.g. "
                                  "enable_thinking=false); repeat for more")
        command.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                             help="auto (the default): bfloat16 on a GPU, float32 on a CPU")
    return p


def template_vars(items: list[str]) -> dict[str, Any]:
    """`--template-var` NAME=VALUE items as a mapping, values read as YAML scalars (as recipe overrides); checked
    before the model loads, so that a typo is said at once."""
    bad = next((item for item in items if item.partition("=")[1] != "=" or item.startswith("=")), None)
    if bad is not None:
        raise UserError(f"--template-var {bad!r}: expected NAME=VALUE, e.g. enable_thinking=false")
    return parse_overrides(items)


def chat_variables(args: argparse.Namespace, tokenizer: Any, variables: dict[str, Any]) -> dict[str, Any]:
    """The chat template's variables for `generate` and `score`: those the run trained with, saved beside its
    model, under `--template-var`'s; checked against the template."""
    from finetune.generate import saved_template_kwargs, template_kwargs

    saved = {} if args.raw else saved_template_kwargs(args.model)
    return template_kwargs(tokenizer, {**saved, **variables}, args.raw, "--template-var")


def generate(args: argparse.Namespace) -> None:
    """Print the answer to each prompt (of the command line, else of each line of stdin) as it comes."""
    from finetune.generate import answers, load

    if args.max_new_tokens < 1 or args.temperature < 0:
        raise UserError("generate: expected --max-new-tokens >= 1 and --temperature >= 0")
    variables = template_vars(args.template_var)
    model, tokenizer = load(args.model, args.dtype)
    kwargs = chat_variables(args, tokenizer, variables)
    if not args.prompts and sys.stdin.isatty():
        print("one prompt per line; Ctrl-D ends", file=sys.stderr)
    prompts = args.prompts or (line.strip() for line in sys.stdin if line.strip())
    for answer in answers(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.raw, kwargs=kwargs):
        print(answer, flush=True)


def show(recipe: Any, n: int) -> None:
    """`--show-rows N`: the data as a run would build it (cached the same way), without loading the model."""
    from finetune.model import load_tokenizer
    from finetune.preview import show_rows
    from finetune.tasks import get_task

    tokenizer = load_tokenizer(recipe.model)
    print(show_rows(tokenizer, get_task(recipe.task).build_data(recipe, tokenizer).train, n))


def setup_logging() -> None:
    """finetune's own messages at INFO; other libraries only warn."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    logging.getLogger("finetune").setLevel(logging.INFO)
    # peft imports bitsandbytes on every LoRA run or merge; on CPUs with AVX512-BF16 it then looks for a faster
    # 4-bit kernel on the hub through the `kernels` package (which transformers >= 5.25 installs), and both warn
    # when it is not there or the hub is offline: it matters only to QLoRA on a CPU
    for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _close_progress_bars() -> None:
    """Close the bars an error left drawn (it was raised inside their loop), so the error starts its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _leave_process_group() -> None:
    """Tear down a launch's process group before exiting on an error, as a finished run does (`end_training`),
    instead of leaving it to the interpreter's shutdown. Seen once there (a full suite run, not reproduced in
    36 launches since): the main process of a 2-process launch said its error, then died of SIGABRT."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # already exiting with the user's error; a failed teardown must not replace it
            pass


def _single_launcher() -> int | None:
    """The pid of `accelerate launch` when it started this process alone, or None. Its one-process launcher
    turns any non-zero exit of its child into a `CalledProcessError` traceback of its own (Accelerate 1.16;
    without `-q`), under the child's one-line error. Several processes (`WORLD_SIZE`) go through torch's elastic
    launcher instead, and anything else between (mpirun) is not this launcher."""
    if "ACCELERATE_USE_CPU" not in os.environ or "WORLD_SIZE" in os.environ:  # the launcher sets the first
        return None
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:  # no /proc (macOS): the launcher's traceback stays
        return None
    names = [os.path.basename(a) for a in args]
    return parent if "launch" in names and ("accelerate" in names or "accelerate-launch" in names) else None


def _stop_single_launcher() -> None:
    """After a user error has been said: end `accelerate launch`'s one-process launcher with SIGTERM, on which it
    passes on the rest of this process's output and exits (status 143) without a traceback of its own."""
    launcher = _single_launcher()
    if launcher is not None:
        os.kill(launcher, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    # overrides (and prompts) may also follow a flag (`sft r.yaml --eval-only train.lr=1`), which argparse alone
    # would refuse
    args, extra = p.parse_known_args(argv)
    trailing = next((name for name in ("overrides", "prompts", "responses") if hasattr(args, name)), None)
    unknown = [e for e in extra if e.startswith("-") or trailing is None]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        setattr(args, trailing, getattr(args, trailing) + extra)
    setup_logging()
    first = os.environ.get("RANK", "0") == "0"  # the main process of a launch (or the only one)
    checked = False  # until the recipe is checked: its errors are the same in every process, said once
    try:
        if args.command == "merge":
            from finetune.merge import merge_adapter

            merge_adapter(args.adapter, args.output, args.base, args.dtype, args.overwrite)
            return 0
        if args.command == "generate":
            generate(args)
            return 0
        if args.command == "score":
            from finetune.generate import load
            from finetune.score import scores

            variables = template_vars(args.template_var)
            model, tokenizer = load(args.model, args.dtype, reward=True)
            kwargs = chat_variables(args, tokenizer, variables)
            for value in scores(model, tokenizer, args.prompt, args.responses, args.raw, kwargs):
                print(f"{value:.6g}")
            return 0
        overrides = parse_overrides(args.overrides)
        declared = read_yaml(args.recipe).get("task", args.command)
        if overrides.get("task", declared) != args.command:
            raise UserError(f"{args.recipe}: task: the recipe is for `{declared}`, so run `finetune {declared} ...`")
        overrides["task"] = args.command
        recipe = load_recipe(args.recipe, overrides)
        checked = True
        if args.print_config:
            print(to_yaml(recipe), end="")
            return 0
        if args.show_rows < 0:
            raise UserError(f"--show-rows: expected a number of rows >= 1, got {args.show_rows}")
        if args.show_rows:
            show(recipe, args.show_rows)
            return 0
        from finetune.loop import run
        from finetune.tasks import get_task

        result = run(recipe, get_task(recipe.task), eval_only=args.eval_only)
        if args.eval_only and first:  # once, not by every process of a launch
            print(json.dumps(result.metrics), flush=True)
    except UserError as e:
        if first or (checked and not isinstance(e, SaidByMainProcess)):
            _close_progress_bars()
            print(f"finetune: error: {e}", file=sys.stderr, flush=True)
            _leave_process_group()
            _stop_single_launcher()
        else:  # the main process says it: let it exit first, and the launcher stop this one (exiting first,
            _leave_process_group()  # this one could have the main process killed before it printed the error)
            time.sleep(10)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training starts, or a second one during it (the first saves)
        _close_progress_bars()
        print("finetune: interrupted", file=sys.stderr, flush=True)
        _leave_process_group()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
