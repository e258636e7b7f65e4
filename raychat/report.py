"""The report card (`raychat report`, and the end of `raychat speedrun`): report/report.md under the base dir.

It only reads what the stages already wrote (nothing is re-measured): report/*.json from each stage,
report/stages/*.json with the pipeline's wall-clock times, the TensorBoard scalars under tb/ for the
curves. A stage whose output is absent is shown as missing, never as a zero. The summary table follows
nanochat's: CORE for the base model; ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval and ChatCORE for the
chat models (MID, SFT, RL), read from report/chat_eval_{source}.json once chat evaluation has run.
Every file (the markdown and each PNG) is written atomically.
"""
from __future__ import annotations

import io
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from raychat.common import UserError, atomic_write, get_base_dir, report_dir

MISSING = "missing"
NOT_MEASURED = "-"
CHAT_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]
COLUMNS = {"BASE": "base", "MID": "mid", "SFT": "sft", "RL": "rl"}   # column -> checkpoint source
TRAINING = [("base", "Pretraining (base)"), ("mid", "Mid-training"), ("sft", "SFT"), ("rl", "RL")]
REPO = Path(__file__).resolve().parent.parent


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


# ------------------------------------------------------------------------------------------- header

def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout, e.g. a Ray job's working dir)"


def hardware() -> str:
    import os
    import torch
    cpu = f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()})"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{len(names)} x {names[0]}; {cpu}"
    return f"no GPU; {cpu}"


def versions() -> str:
    found = [f"Python {platform.python_version()}"]
    for package in ("torch", "ray", "deepspeed", "raychat"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def lines_of_code() -> dict[str, int]:
    """Non-blank lines per part of the repository (as nanochat's report counts its size)."""
    parts = {"raychat (Python)": ("raychat", "*.py"), "serve": ("serve", "*.py"), "jobs": ("jobs", "*.py"),
             "tokenizer (Rust)": ("tokenizer_rust/src", "*.rs"), "tests": ("tests", "*.py")}
    counts = {}
    for label, (folder, pattern) in parts.items():
        files = sorted((REPO / folder).rglob(pattern)) if (REPO / folder).is_dir() else []
        counts[label] = sum(1 for f in files for line in f.read_text(errors="replace").splitlines() if line.strip())
    return counts


def stage_times(cfg) -> list[tuple[str, float | None, int]]:
    """(stage, seconds or None, GPUs it holds) in pipeline order: the speedrun's record, else the stage's own."""
    from raychat.pipeline import STAGES
    own = {"tokenizer": ("tokenizer.json", "train_seconds"), "base_eval": ("base_eval.json", "seconds"),
           **{s: (f"{s}_train.json", "seconds") for s, _ in TRAINING}}
    rows = []
    for stage in (s for s in STAGES if s.in_speedrun):
        seconds = (read_json(report_dir() / "stages" / f"{stage.name}.json") or {}).get("seconds")
        if seconds is None and stage.name in own:
            name, key = own[stage.name]
            seconds = (read_json(report_dir() / name) or {}).get(key)
        rows.append((stage.name, seconds, stage.gpus(cfg)))
    return rows


# -------------------------------------------------------------------------------------------- plots

def scalars(stage: str, run: str, match) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of tb/{stage}/{run} whose tag satisfies `match`: {tag: [(step, value)]}, one value
    per step (a resumed run logs some steps twice: the later value wins)."""
    directory = get_base_dir() / "tb" / stage / run
    if not directory.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    found = {}
    for events in sorted(directory.glob("events.out.tfevents.*")):   # one file per (re)start, in time order
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            if match(tag):
                for event in accumulator.Scalars(tag):
                    found.setdefault(tag, {})[event.step] = event.value
    return {tag: sorted(values.items()) for tag, values in found.items()}


def save_figure(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    atomic_write(path, buffer.getvalue())
    return path


def plot_curves(stage: str, title: str, curves: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    """One panel per tag (loss, val bpb, reward...) against the step."""
    from matplotlib.figure import Figure
    curves = {tag: points for tag, points in curves.items() if points}
    if not curves:
        return None
    figure = Figure(figsize=(4.5 * len(curves), 3.2))
    for i, (tag, points) in enumerate(sorted(curves.items())):
        axis = figure.add_subplot(1, len(curves), i + 1)
        steps, values = zip(*points)
        axis.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3)
        axis.set_title(f"{title}: {tag}", fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    return save_figure(figure, path)


def plot_core(tasks: dict, path: Path) -> Path | None:
    from matplotlib.figure import Figure
    if not tasks:
        return None
    labels = list(tasks)
    figure = Figure(figsize=(8, 0.28 * len(labels) + 1.2))
    axis = figure.add_subplot(1, 1, 1)
    axis.barh(labels, [tasks[t]["centered"] for t in labels])
    axis.axvline(0, color="black", linewidth=0.8)
    axis.invert_yaxis()
    axis.tick_params(axis="y", labelsize=7)
    axis.set_xlabel("centered accuracy (0 = random guessing)")
    axis.set_title("CORE per task (base model)", fontsize=9)
    return save_figure(figure, path)


# ------------------------------------------------------------------------------------------ content

def summary_rows(out: Path) -> tuple[list[str], list[list[str]]]:
    """The summary table: rows CORE + chat tasks + ChatCORE, columns BASE/MID/SFT/RL. A value the pipeline
    measures but whose output is absent is 'missing'; a pair it never measures (CORE of a chat model) is '-'."""
    base_eval = read_json(out / "base_eval.json")
    chat = {column: read_json(out / f"chat_eval_{source}.json") for column, source in COLUMNS.items() if source != "base"}
    header = ["metric", *COLUMNS]
    rows = [["CORE", fmt(base_eval.get("core_metric") if base_eval else None), *[NOT_MEASURED] * 3]]
    for task in CHAT_TASKS + ["ChatCORE"]:
        row = [task, NOT_MEASURED]
        for column in ("MID", "SFT", "RL"):
            result = chat[column]
            if result is None:
                row.append(MISSING)
            elif task == "ChatCORE":
                row.append(fmt(result.get("chatcore")))
            else:
                row.append(fmt((result.get("tasks", {}).get(task) or {}).get("accuracy")))
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def training_section(stage: str, title: str, run: str, out: Path) -> list[str]:
    summary = read_json(out / f"{stage}_train.json")
    lines = [f"## {title}", ""]
    if summary is None:
        return lines + [f"**{MISSING}**: no report/{stage}_train.json (the stage has not finished).", ""]
    keys = [("parameters", "num_params", 0), ("steps", "num_iterations", 0), ("wall-clock (s)", "seconds", 0),
            ("final loss", "loss", 4), ("val bpb", "val_bpb", 4), ("tokens/s", "tokens_per_s", 0),
            ("MFU", "mfu", 3), ("conversations", "conversations", 0), ("checkpoint", "checkpoint", 0)]
    rows = []
    for label, key, digits in keys:
        value = summary.get(key)
        if value is None and key in ("conversations", "mfu"):
            continue   # not every stage has these (pretraining has no conversations; CPUs no MFU)
        if isinstance(value, float) and digits == 0:
            value = round(value)
        rows.append([label, fmt(value, digits)])
    lines += [markdown_table(["", "value"], rows), ""]
    match = (lambda tag: "reward" in tag or "pass@" in tag or tag in ("train/loss", "val/val_bpb")) if stage == "rl" \
        else (lambda tag: tag in ("train/loss", "val/val_bpb"))
    plot = plot_curves(stage, title, scalars(stage, run, match), out / f"{stage}_curves.png")
    lines += [f"![{title} curves]({plot.name})" if plot else f"(no TensorBoard curves in tb/{stage}/{run})", ""]
    return lines


def build(cfg, usd_per_gpu_hour: float) -> tuple[str, str]:
    """(report markdown, the summary table as text)."""
    out = report_dir()
    times = stage_times(cfg)
    gpus = max((g for _, _, g in times), default=0)
    total = sum(s for _, s, _ in times if s is not None)
    lines = ["# raychat report card", "",
             f"- generated: {time.strftime('%Y-%m-%d %H:%M:%S')}, preset `{cfg.preset}`, run `{cfg.run.name}`",
             f"- git commit: {git_commit()}", f"- hardware: {hardware()}", f"- software: {versions()}",
             "- lines of code: " + ", ".join(f"{k} {v:,}" for k, v in lines_of_code().items()), ""]
    rows = [[name, MISSING if seconds is None else f"{seconds:,.0f}",
             f"{seconds / 3600 * gpus * usd_per_gpu_hour:,.2f}" if seconds is not None else MISSING]
            for name, seconds, _ in times]
    rows.append(["total", f"{total:,.0f}", f"{total / 3600 * gpus * usd_per_gpu_hour:,.2f}"])
    lines += ["## Wall-clock and cost", "",
              f"Cost: the cluster's {gpus} GPU(s) held for each stage's wall-clock at ${usd_per_gpu_hour:g} per "
              f"GPU-hour{' (no GPU: nothing to pay for)' if gpus == 0 else ''}.", "",
              markdown_table(["stage", "seconds", "cost ($)"], rows), ""]
    header, summary = summary_rows(out)
    lines += ["## Summary", "", markdown_table(header, summary), "",
              f"`{MISSING}`: the stage that measures it has not run (or not finished); `{NOT_MEASURED}`: not measured "
              "for that model.", ""]

    tokenizer = read_json(out / "tokenizer.json")
    lines += ["## Tokenizer", ""]
    if tokenizer is None:
        lines += [f"**{MISSING}**: no report/tokenizer.json.", ""]
    else:
        lines += [markdown_table(["", "value"], [[k, fmt(tokenizer.get(k), 3)] for k in (
            "vocab_size", "train_docs", "train_chars", "train_seconds", "val_bytes_per_token", "fingerprint")]), ""]

    lines += training_section("base", "Pretraining (base)", cfg.run.name, out)
    base_eval = read_json(out / "base_eval.json")
    lines += ["## Base evaluation", ""]
    if base_eval is None:
        lines += [f"**{MISSING}**: no report/base_eval.json.", ""]
    else:
        core = base_eval.get("core", {})
        partial = (f" (partial: {core.get('num_tasks')} of {core.get('num_tasks_total')} tasks; missing "
                   f"{', '.join(core['missing_tasks'])})" if core.get("missing_tasks") else "")
        lines += [f"Step {base_eval.get('step')}: val bpb {fmt(base_eval.get('val_bpb'))}, "
                  f"CORE {fmt(base_eval.get('core_metric'))}{partial}.", ""]
        tasks = core.get("tasks", {})
        lines += [markdown_table(["task", "accuracy", "centered"],
                                 [[t, fmt(r.get("accuracy")), fmt(r.get("centered"))] for t, r in tasks.items()]), ""]
        plot = plot_core(tasks, out / "core_tasks.png")
        if plot:
            lines += [f"![CORE per task]({plot.name})", ""]
    for stage, title in TRAINING[1:]:
        lines += training_section(stage, title, cfg.run.name, out)
    lines += ["## Chat evaluation", ""]
    for column, source in COLUMNS.items():
        if source == "base":
            continue
        result = read_json(out / f"chat_eval_{source}.json")
        if result is None:
            lines += [f"- {column}: **{MISSING}** (no report/chat_eval_{source}.json)"]
            continue
        tasks = result.get("tasks", {})
        lines += ["", f"### {column}", "", markdown_table(
            ["task", "accuracy", "centered"],
            [[t, fmt(r.get("accuracy")), fmt(r.get("centered"))] for t, r in tasks.items()]
            + [["ChatCORE", fmt(result.get("chatcore")), ""]])]
    lines.append("")
    return "\n".join(lines), text_table(header, summary)


def write_report(cfg, usd_per_gpu_hour: float = 3.0) -> tuple[Path, str]:
    """Write report/report.md (and its PNGs); returns (path, summary table as text)."""
    if not usd_per_gpu_hour >= 0:
        raise UserError(f"--usd-per-gpu-hour must be a price >= 0, got {usd_per_gpu_hour}")
    markdown, table = build(cfg, usd_per_gpu_hour)
    path = report_dir() / "report.md"
    atomic_write(path, markdown)
    return path, table


def main(cfg, args) -> int:
    path, table = write_report(cfg, args.usd_per_gpu_hour)
    print(table)
    print(f"\nreport card: {path}")
    return 0
