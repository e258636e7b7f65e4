"""The stages of a full run, in order, and what "done" means for each one.

This registry is what `raychat speedrun`, the `jobs/<stage>.py` scripts and the report card share. A stage
is the CLI command that runs it (its handler in `raychat.cli.COMMANDS`: no logic is repeated here) plus a
status check that decides, before anything starts, whether its outputs are complete and match the config:

- training stages (`trained`): the latest complete checkpoint is at the run's planned last step (the loop
  records `num_iterations` in every checkpoint's meta), was trained with the same result-deciding config
  fields, the current tokenizer and, for fine-tuning stages, the parent stage's current final weights.
  A checkpoint short of its last step means "resume" (the trainer continues from it by itself); one from
  another config or parent is a conflict the user must resolve, never silently continued.
- other stages (`stamped`): after a stage succeeds, `report/stages/{name}.json` records the config fields
  that decide its outputs, the identity of its inputs (e.g. the weights it evaluated) and of its outputs
  (e.g. the tokenizer's fingerprint, the sha256 of a report file). It is done while all three still match.

Every successful stage also records its wall-clock time in that file, for the report card.
Adding a stage is one `PipelineStage` entry in `STAGES` (and a three-line `jobs/<name>.py`).
"""
from __future__ import annotations

import importlib
import json
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from raychat.common import UserError, atomic_write, checkpoint_dir, get_base_dir, report_dir, tokenizer_dir
from raychat.config import Config, ConfigError, load_config

# Fields that change how a stage runs but not what it produces: a change in these never invalidates outputs.
OPERATIONAL = {
    "log_every", "save_every", "eval_every", "max_failures", "cpus_per_worker", "resources_per_worker",
    "core_every", "core_max_per_task", "eval_tokens",            # evaluation during training, not the weights
    "download_workers", "download_retries", "download_backoff_s", "download_timeout_s", "base_url",
    "tokenizer_batch_size", "buffer_mb", "prefetch_batches", "tasks_per_rank", "ray_data",  # same batches either way
    "num_threads", "eval_hf_chars",
}


@dataclass
class Status:
    state: str      # "done", "run" (never started / outputs missing), "resume" (interrupted), "conflict"
    reason: str


@dataclass(frozen=True)
class PipelineStage:
    name: str                                  # jobs/{name}.py, report/stages/{name}.json
    command: tuple[str, ...]                   # the `raychat` command that runs it, e.g. ("train", "base")
    status: Stamped | Trained | None           # what "done" means; None: always runs (serve)
    outputs: Callable[[Config], list[str]]     # where its outputs go, printed by its job
    gpus: Callable[[Config], int] = lambda cfg: 0   # GPUs it holds, for the report card's cost
    in_speedrun: bool = True


# --------------------------------------------------------------------------------------- fingerprints

def config_fields(cfg_dict: dict, sections: dict[str, tuple[str, ...] | None]) -> dict:
    """{"section.field": value} for the listed sections (all their fields but OPERATIONAL ones, or the
    named fields only)."""
    picked = {}
    for section, names in sections.items():
        values = cfg_dict.get(section, {})
        for key in sorted(values if names is None else names):
            if names is not None or key not in OPERATIONAL:
                picked[f"{section}.{key}"] = values.get(key)
    return picked


def differences(old: dict, new: dict) -> str:
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(changed[:4]) + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else "")


def file_sha256(path: Path) -> str | None:
    from raychat.checkpoint import sha256_file
    return sha256_file(path) if Path(path).is_file() else None


def tokenizer_fingerprint() -> str | None:
    """The fingerprint saved in tokenizer/bpe.json (None without a trained tokenizer)."""
    try:
        return json.loads((tokenizer_dir() / "bpe.json").read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def final_checkpoint(stage: str, run: str, storage_path: str) -> tuple[Path | None, dict]:
    """(the latest complete checkpoint whose weights verify, its meta) or (None, {})."""
    from raychat.checkpoint import MODEL_FILE, latest_checkpoint, read_meta
    path = latest_checkpoint(checkpoint_dir(stage, run, storage_path), [MODEL_FILE])
    return (path, read_meta(path)) if path is not None else (None, {})


def final_weights(stage: str, run: str, storage_path: str) -> str | None:
    """sha256 of a stage's finished weights (latest checkpoint at its planned last step), else None."""
    from raychat.checkpoint import MODEL_FILE
    path, meta = final_checkpoint(stage, run, storage_path)
    if path is None or meta.get("step") != meta.get("num_iterations"):
        return None
    return meta["files"][MODEL_FILE]


# ------------------------------------------------------------------------------------------- stamps

def stamp_path(name: str) -> Path:
    return report_dir() / "stages" / f"{name}.json"


def read_stamp(name: str) -> dict:
    try:
        return json.loads(stamp_path(name).read_text())
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class Stamped:
    """Done while the config fields, inputs and outputs recorded in report/stages/{name}.json after the stage
    last succeeded still match. `outputs(cfg)` is None when the outputs are missing."""
    sections: dict
    inputs: Callable[[Config], dict]
    outputs: Callable[[Config], dict | None]

    def record(self, cfg: Config) -> dict:
        return {"config": config_fields(cfg.to_dict(), self.sections), "inputs": self.inputs(cfg),
                "outputs": self.outputs(cfg)}

    def check(self, cfg: Config, name: str) -> Status:
        stamp = read_stamp(name)
        if "outputs" not in stamp:
            return Status("run", "not run yet")
        now = self.record(cfg)
        if stamp.get("config") != now["config"]:
            return Status("run", f"config changed: {differences(stamp.get('config', {}), now['config'])}")
        if stamp.get("inputs") != now["inputs"]:
            return Status("run", "its inputs changed since it ran")
        if now["outputs"] is None or now["outputs"] != stamp["outputs"]:
            return Status("run", "its outputs are missing or were replaced")
        return Status("done", f"outputs complete ({stamp.get('finished', '?')})")


@dataclass(frozen=True)
class Trained:
    """A training stage, judged by its checkpoints (see the module docstring)."""
    stage: str
    section: str
    parent: Callable[[Config], tuple[str, str]] | None = None   # cfg -> (parent stage, parent run)

    def record(self, cfg: Config) -> dict:
        return {}

    def check(self, cfg: Config, name: str) -> Status:
        path, meta = final_checkpoint(self.stage, cfg.run.name, cfg.run.storage_path)
        where = checkpoint_dir(self.stage, cfg.run.name, cfg.run.storage_path)
        if path is None:
            return Status("run", f"no checkpoint in {where}")
        fix = f"remove {where} or choose another --set run.name=..."
        sections = {self.section: None, "run": ("seed",), **({"data": None} if self.stage == "base" else {})}
        old, new = config_fields(meta.get("config", {}), sections), config_fields(cfg.to_dict(), sections)
        if old != new:
            return Status("conflict", f"{path} was trained with another config ({differences(old, new)}): {fix}")
        if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint():
            return Status("conflict", f"{path} was trained with another tokenizer: {fix}")
        if self.parent is not None:
            parent_stage, parent_run = self.parent(cfg)
            weights = final_weights(parent_stage, parent_run, cfg.run.storage_path)
            if (meta.get("parent") or {}).get("weights_sha256") != weights:
                return Status("conflict", f"{path} continues other {parent_stage} weights than the current final "
                                          f"{parent_stage} checkpoint: {fix}")
        step, last = meta.get("step"), meta.get("num_iterations")
        if last is None:
            return Status("resume", f"{path} does not record its planned last step: running it (it stops at once "
                                    f"if it is complete)")
        if step < last:
            return Status("resume", f"interrupted at step {step} of {last}: resuming from {path}")
        return Status("done", f"final checkpoint {path} (step {step})")


def _parent_run(section: str):
    return lambda cfg: getattr(cfg, section).parent_run or cfg.run.name


def _workers_gpus(section: str):
    return lambda cfg: getattr(cfg, section).num_workers if getattr(cfg, section).use_gpu else 0


def _report_files(*names: str):
    def outputs(cfg: Config) -> dict | None:
        digests = {name: file_sha256(report_dir() / name) for name in names}
        return None if None in digests.values() else digests
    return outputs


def _shard_outputs(cfg: Config) -> dict | None:
    from raychat.data.fineweb import local_shard_dir, shard_paths
    if local_shard_dir() is not None:
        return {"local": str(local_shard_dir())}
    try:
        return {"shards": [p.name for p in shard_paths(cfg, "train", download=False) + shard_paths(cfg, "val", download=False)]}
    except UserError:
        return None


def _checkpoints(stage: str):
    return lambda cfg: [str(checkpoint_dir(stage, cfg.run.name, cfg.run.storage_path)),
                        str(report_dir() / f"{stage}_train.json"), str(get_base_dir() / "tb" / stage / cfg.run.name)]


CHAT_EVAL_FIELDS = ("chat_tasks", "max_problems", "num_samples", "temperature", "top_k", "max_new_tokens", "seed")


def _chat_eval(source: str) -> "PipelineStage":
    """Chat evaluation of one stage's final weights: done while those weights and the eval settings match."""
    files = (f"chat_eval_{source}.json", f"chat_eval_{source}.csv")
    return PipelineStage(f"chat_eval_{source}", ("eval", "chat", "--source", source),
                         Stamped({"eval": CHAT_EVAL_FIELDS},
                                 lambda cfg: {source: final_weights(source, cfg.run.name, cfg.run.storage_path)},
                                 _report_files(*files)),
                         lambda cfg: [str(report_dir() / name) for name in files],
                         lambda cfg: cfg.eval.num_actors if cfg.eval.use_gpu else 0)


# ----------------------------------------------------------------------------------------- registry

STAGES: list[PipelineStage] = [
    PipelineStage("data", ("data", "download"),
                  Stamped({"data": ("num_shards", "max_shard")}, lambda cfg: {}, _shard_outputs),
                  lambda cfg: [str(get_base_dir() / "base_data")]),
    PipelineStage("tokenizer", ("tokenizer", "train"),
                  Stamped({"tokenizer": None}, lambda cfg: {},
                          lambda cfg: {"fingerprint": fp} if (fp := tokenizer_fingerprint()) else None),
                  lambda cfg: [str(tokenizer_dir()), str(report_dir() / "tokenizer.json")]),
    PipelineStage("base", ("train", "base"), Trained("base", "pretrain"), _checkpoints("base"),
                  _workers_gpus("pretrain")),
    PipelineStage("base_eval", ("eval", "base"),
                  Stamped({"eval": ("core_max_per_task", "bpb_tokens", "bundle_url", "bundle_sha256")},
                          lambda cfg: {"base": final_weights("base", cfg.run.name, cfg.run.storage_path)},
                          _report_files("base_eval.json", "base_eval_core.csv")),
                  lambda cfg: [str(report_dir() / "base_eval.json"), str(report_dir() / "base_eval_core.csv")],
                  lambda cfg: cfg.eval.num_actors if cfg.eval.use_gpu else 0),
    PipelineStage("mid", ("train", "mid"),
                  Trained("mid", "midtrain", lambda cfg: ("base", _parent_run("midtrain")(cfg))),
                  _checkpoints("mid"), _workers_gpus("midtrain")),
    _chat_eval("mid"),
    PipelineStage("sft", ("train", "sft"),
                  Trained("sft", "sft", lambda cfg: (cfg.sft.source, _parent_run("sft")(cfg))),
                  _checkpoints("sft"), _workers_gpus("sft")),
    _chat_eval("sft"),
    PipelineStage("rl", ("train", "rl"), Trained("rl", "rl", lambda cfg: (cfg.rl.source, _parent_run("rl")(cfg))),
                  _checkpoints("rl"), _workers_gpus("rl")),
    _chat_eval("rl"),
    PipelineStage("serve", ("serve",), None,
                  lambda cfg: [f"http://{cfg.serve.host}:{cfg.serve.port}/ (the {cfg.serve.source} checkpoint)"],
                  lambda cfg: cfg.serve.num_replicas if cfg.serve.use_gpu else 0, in_speedrun=False),
]


def get_stage(name: str) -> PipelineStage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise UserError(f"unknown stage '{name}': choose one of {', '.join(s.name for s in STAGES)}")


def stage_status(stage: PipelineStage, cfg: Config) -> Status:
    return stage.status.check(cfg, stage.name) if stage.status is not None else Status("run", "always runs")


# ---------------------------------------------------------------------------------------- running

def run_stage(stage: PipelineStage, preset: str, overrides: list[str]) -> float:
    """Run the stage's CLI handler in this process (same parser, same handler as `raychat ...`), then record
    its stamp. Returns its wall-clock seconds; raises UserError (or whatever the handler raised)."""
    from raychat.cli import build_parser
    argv = [*stage.command, "--preset", preset, *(x for o in overrides for x in ("--set", o))]
    args = build_parser().parse_args(argv)
    cfg = load_config(args.preset, args.overrides)
    module, function = args.handler.split(":")
    started = time.time()
    code = int(getattr(importlib.import_module(module), function)(cfg, args) or 0)
    seconds = time.time() - started
    if code != 0:
        raise UserError(f"`raychat {' '.join(stage.command)}` exited with status {code}")
    if stage.status is not None:
        stamp = {"stage": stage.name, **stage.status.record(cfg), "seconds": round(seconds, 1),
                 "gpus": stage.gpus(cfg), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write(stamp_path(stage.name), json.dumps(stamp, indent=2, default=str) + "\n")
    return seconds


def job_main(name: str, argv: list[str] | None = None) -> int:
    """`python jobs/<name>.py --preset P [--set ...]`, e.g. under `ray job submit`: run one stage, then say
    where its outputs went."""
    import argparse

    from raychat.cli import _add_config_args
    parser = argparse.ArgumentParser(prog=f"jobs/{name}.py", description=f"the {name} stage as a Ray job")
    _add_config_args(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        stage = get_stage(name)
        cfg = load_config(args.preset, args.overrides)
        run_stage(stage, args.preset, args.overrides)
    except (UserError, ConfigError) as error:
        print(f"raychat: error: {error}", file=sys.stderr)
        return 2
    print(f"{name}: outputs in\n" + "\n".join(f"  {path}" for path in stage.outputs(cfg)), flush=True)
    return 0


def resume_command(preset: str, overrides: list[str]) -> str:
    return shlex.join(["raychat", "speedrun", "--preset", preset, *(x for o in overrides for x in ("--set", o))])


def speedrun_main(cfg: Config, args) -> int:
    """`raychat speedrun`: every stage in order on one Ray; skip the done ones, resume an interrupted one, stop
    at the first failure with one line naming the stage and the command that resumes; then the report card."""
    again = resume_command(args.preset, args.overrides)
    stages = [s for s in STAGES if s.in_speedrun]
    print(f"speedrun ({args.preset}): {' -> '.join(s.name for s in stages)} -> report; outputs in {get_base_dir()}",
          flush=True)
    for stage in stages:
        status = stage_status(stage, cfg)
        if status.state == "done":
            print(f"[speedrun] {stage.name}: skipped, already done: {status.reason}", flush=True)
            continue
        if status.state == "conflict":
            raise UserError(f"speedrun stopped at stage '{stage.name}': {status.reason}")
        print(f"[speedrun] {stage.name}: {status.reason}: running `raychat {' '.join(stage.command)}`", flush=True)
        try:
            seconds = run_stage(stage, args.preset, args.overrides)
        except KeyboardInterrupt:
            raise UserError(f"speedrun interrupted in stage '{stage.name}'; resume with: {again}") from None
        except Exception as error:
            if not isinstance(error, (UserError, ConfigError)):   # a bug, not a user mistake: keep its traceback
                traceback.print_exc()
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"speedrun stopped at stage '{stage.name}': {message}; resume with: {again}") from None
        print(f"[speedrun] {stage.name}: done in {seconds:.0f} s", flush=True)
    from raychat.report import write_report
    path, table = write_report(cfg, usd_per_gpu_hour=args.usd_per_gpu_hour)
    print(f"\n{table}\n\nreport card: {path}\nchat with the model: raychat serve --preset {args.preset}"
          f"{''.join(' --set ' + shlex.quote(o) for o in args.overrides)}  (or raychat chat)", flush=True)
    return 0
