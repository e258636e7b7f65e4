"""The `raychat` command: one subcommand per stage, each taking --preset and repeatable --set.

Handlers are named by import path and imported only when their command runs, so `raychat --help`
does not import torch or Ray. A handler receives the effective `Config` and the parsed arguments;
a `UserError` or `ConfigError` it raises is printed as one line (exit 2), never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from raychat.common import UserError
from raychat.config import PRESETS, ConfigError, load_config

# (command, subcommand) -> (handler "module:function", help, extra arguments)
COMMANDS: dict[tuple[str, str], tuple[str, str, list[tuple[tuple, dict]]]] = {
    ("config", "show"): ("raychat.cli:config_show", "print the effective config as JSON", []),
    ("tokenizer", "train"): ("raychat.tokenizer_train:train_main",
                             "train the BPE tokenizer on the pretraining shards", []),
    ("tokenizer", "eval"): ("raychat.tokenizer_train:eval_main",
                            "compare bytes/token with other tokenizers on several kinds of text", []),
    ("data", "download"): ("raychat.data.fineweb:download_main", "download FineWeb-EDU shards", [
        (("--num-shards",), {"type": int, "default": None, "help": "train shards (default: from the token budget)"}),
    ]),
    ("train", "base"): ("raychat.train.launch:train_main", "pretrain the base model on Ray Train + DeepSpeed", []),
    ("train", "mid"): ("raychat.train.launch:train_main",
                       "mid-train the base model on conversations, tool use and multiple choice", []),
    ("train", "sft"): ("raychat.train.launch:train_main",
                       "fine-tune the mid model into a chat model (loss on the assistant's tokens)", []),
    ("train", "rl"): ("raychat.train.launch:train_main",
                      "RL on GSM8K: rollout actors sample, the learner trains on the rewarded replies", []),
    ("eval", "base"): ("raychat.eval.base:main", "bits-per-byte and CORE of a base checkpoint", [
        (("--source",), {"default": "base", "choices": ["base"], "help": "which checkpoint to evaluate"}),
        (("--step",), {"type": int, "default": None, "help": "checkpoint step (default: the latest)"}),
    ]),
    ("eval", "chat"): ("raychat.eval.chat:main", "chat tasks (ARC, MMLU, GSM8K, HumanEval, spelling) and ChatCORE", [
        (("--source",), {"default": "sft", "choices": ["mid", "sft", "rl"], "help": "which checkpoint to evaluate"}),
        (("--step",), {"type": int, "default": None, "help": "checkpoint step (default: the latest)"}),
        (("--tasks",), {"default": None, "help": "comma-separated task names (default: eval.chat_tasks)"}),
        (("--max-problems",), {"type": int, "default": None, "help": "per task; -1 = all (default: eval.max_problems)"}),
        (("--num-samples",), {"type": int, "default": None, "help": "replies per generative problem, for pass@1..K"}),
    ]),
    ("serve", ""): ("raychat.chat_cli:serve_main", "serve a checkpoint with Ray Serve (API + web UI)", [
        (("--source",), {"default": None, "choices": ["base", "mid", "sft", "rl"]}),
        (("--replicas",), {"type": int, "default": None}),
    ]),
    ("chat", ""): ("raychat.chat_cli:chat_main", "chat in the terminal with a checkpoint or a running service", [
        (("--source",), {"default": None, "choices": ["base", "mid", "sft", "rl"]}),
        (("-p", "--prompt"), {"default": None, "help": "ask one question, print the answer and exit"}),
        (("--url",), {"default": None, "help": "base URL of a running raychat service"}),
        (("--temperature",), {"type": float, "default": 0.6}),
        (("--top-k",), {"type": int, "default": 50}),
        (("--max-tokens",), {"type": int, "default": 512}),
    ]),
}

# the whole pipeline (raychat/pipeline.py) and its report card (raychat/report.py)
_COST = (("--usd-per-gpu-hour",), {"type": float, "default": 3.0,
                                   "help": "price of one GPU-hour for the report card's cost (default 3.0: an "
                                           "8xH100 node at $24/h)"})
COMMANDS.update({
    ("speedrun", ""): ("raychat.pipeline:speedrun_main",
                       "every stage in order, skipping finished ones and resuming an interrupted one; then the report",
                       [_COST]),
    ("report", ""): ("raychat.report:main", "write the report card (report/report.md, plots) from the stages' outputs",
                     [_COST]),
})

STAGE_HELP = {
    "config": "inspect presets and overrides",
    "tokenizer": "stage 1: train / evaluate the Rust BPE tokenizer",
    "data": "pretraining data",
    "train": "training stages (base, mid, sft, rl)",
    "eval": "evaluation (base: bpb + CORE; chat: ARC, MMLU, GSM8K, HumanEval, spelling, ChatCORE)",
}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="d20", help=f"one of: {', '.join(PRESETS)} (default d20)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raychat",
        description="raychat: a ChatGPT-style training pipeline on Ray (tokenizer -> pretrain -> eval -> serve).",
        epilog="Every command takes --preset NAME and --set section.field=value. Example:\n"
               "  raychat tokenizer train --preset demo\n  raychat config show --preset d20 --set pretrain.depth=26",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for (command, sub), (handler, help_text, extra) in COMMANDS.items():
        if sub:
            if command not in groups:
                group = top.add_parser(command, help=STAGE_HELP.get(command, ""), description=STAGE_HELP.get(command))
                groups[command] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            leaf = groups[command].add_parser(sub, help=help_text, description=help_text)
        else:
            leaf = top.add_parser(command, help=help_text, description=help_text)
        _add_config_args(leaf)
        for flags, kwargs in extra:
            leaf.add_argument(*flags, **kwargs)
        leaf.set_defaults(handler=handler)
    return parser


def config_show(cfg, args) -> int:
    print(cfg.to_json())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        cfg = load_config(args.preset, args.overrides)
        module_name, function_name = args.handler.split(":")
        handler = getattr(importlib.import_module(module_name), function_name)
        return int(handler(cfg, args) or 0)
    except (ConfigError, UserError) as error:
        print(f"raychat: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raychat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
