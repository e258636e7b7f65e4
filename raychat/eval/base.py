"""`raychat eval base`: bits-per-byte on the validation shard and CORE of a base checkpoint, on Ray actors.

The driver loads the checkpoint once (verified), renders every CORE item, and starts a model pool
(`raychat.pool`) of `num_actors` actors. One actor also computes bpb; the CORE items are cut into small
chunks that the pool hands to whichever actor is free, so a 20,000-item task and a 32-item one even out. Results are the same as the in-process `evaluate_core` (same items, same
scoring); they go to report/ as a per-task CSV and a JSON, and a table is printed.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path

import ray

from raychat.common import UserError, atomic_write, get_logger, init_ray, report_dir
from raychat.eval.bpb import bpb_totals, limit_tokens
from raychat.eval.core import locate_bundle, model_max_seq_len, prepare_all, score_item, summarize, task_result
from raychat.model import autocast_context
from raychat.pool import ModelPool, ModelWorker, balanced_chunk_size, chunked

log = get_logger()


class EvalWorker(ModelWorker):
    """A pool actor (raychat.pool) that scores chunks of CORE items and computes bpb."""

    def __init__(self, model, tokenizer, use_gpu: bool):
        super().__init__(model, tokenizer, use_gpu)
        self.max_len = model_max_seq_len(self.model)

    def score(self, items: list[dict]) -> list[bool]:
        with autocast_context(self.device):
            return [score_item(self.model, self.tokenizer, item, self.device, self.max_len) for item in items]

    def bpb(self, cfg, max_tokens: int, batch_size: int, seq_len: int) -> dict:
        from raychat.data.pretrain import PretrainStream
        # use_ray=False: read the one validation shard in this actor, not through a nested Ray Data pipeline
        with PretrainStream(cfg, self.tokenizer, "val", batch_size=batch_size, seq_len=seq_len,
                            use_ray=False) as stream, autocast_context(self.device):
            return bpb_totals(self.model, limit_tokens(stream, max_tokens), self.tokenizer.token_bytes)


def core_on_pool(pool: ModelPool, bundle: Path, max_per_task: int) -> dict:
    """CORE with the items spread over the pool's actors (same result as `core.evaluate_core`)."""
    prepared, missing = prepare_all(bundle, max_per_task)
    size = balanced_chunk_size(sum(len(items) for _, items in prepared), len(pool))
    chunks = [(task, part) for task, items in prepared for part in chunked(items, size)]
    scored = pool.map("score", [part for _, part in chunks])
    results = {}
    for task, items in prepared:
        correct = [c for (t, _), cs in zip(chunks, scored) if t is task for c in cs]
        assert len(correct) == len(items), f"{task.label}: {len(correct)} of {len(items)} items scored"
        results[task.label] = task_result(task, correct)
    return summarize(results, missing)


def evaluate_core_ray(model, tokenizer, cfg, max_per_task: int, num_actors: int, use_gpu: bool,
                      bundle: Path | None = None) -> dict:
    """CORE spread over `num_actors` Ray actors (Ray must be initialised)."""
    bundle = Path(bundle) if bundle is not None else locate_bundle(cfg)
    with ModelPool(EvalWorker, model, tokenizer, num_actors, use_gpu) as pool:
        return core_on_pool(pool, bundle, max_per_task)


# --------------------------------------------------------------------------------------------- output

CSV_COLUMNS = ["task", "task_type", "num_fewshot", "num_examples", "random_baseline", "accuracy", "centered"]


def write_results(results: dict, directory: Path) -> tuple[Path, Path]:
    """report/base_eval.json (everything) and report/base_eval_core.csv (one row per task)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for label, r in results["core"]["tasks"].items():
        writer.writerow([label, r["task_type"], r["num_fewshot"], r["num_examples"], r["random_baseline"],
                         f"{r['accuracy']:.6f}", f"{r['centered']:.6f}"])
    csv_path, json_path = directory / "base_eval_core.csv", directory / "base_eval.json"
    atomic_write(csv_path, buffer.getvalue())
    atomic_write(json_path, json.dumps(results, indent=2) + "\n")
    return csv_path, json_path


def format_table(core: dict) -> str:
    lines = [f"{'task':34s} {'type':18s} {'shots':>5s} {'n':>6s} {'acc':>7s} {'centered':>9s}"]
    for label, r in core["tasks"].items():
        lines.append(f"{label:34s} {r['task_type']:18s} {r['num_fewshot']:5d} {r['num_examples']:6d} "
                     f"{r['accuracy']:7.4f} {r['centered']:9.4f}")
    if core["missing_tasks"]:
        lines.append(f"missing (no data file in the bundle): {', '.join(core['missing_tasks'])}")
        lines.append(f"CORE {core['core']:.4f}  (partial: mean over the {core['num_tasks']} of "
                     f"{core['num_tasks_total']} tasks present, not comparable with a full CORE)")
    else:
        lines.append(f"CORE {core['core']:.4f}  (all {core['num_tasks']} tasks)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI

def main(cfg, args) -> int:
    from raychat.checkpoint import load_stage_model

    if cfg.eval.core_max_per_task == 0:
        raise UserError("eval.core_max_per_task must be -1 (all) or >= 1, got 0")
    started = time.time()
    model, tokenizer, meta = load_stage_model(args.source, cfg.run.name, args.step, storage_path=cfg.run.storage_path)
    bundle = locate_bundle(cfg)
    seq_len = min(cfg.pretrain.sequence_len, model_max_seq_len(model) or cfg.pretrain.sequence_len)
    log.info(f"evaluating {args.source}/{cfg.run.name} step {meta.get('step')} on {cfg.eval.num_actors} actors")

    init_ray()
    with ModelPool(EvalWorker, model, tokenizer, cfg.eval.num_actors, cfg.eval.use_gpu) as pool:
        # bpb on the first actor; CORE chunks queue behind it there and run at once on the others
        bpb_ref = pool.actors[0].bpb.remote(cfg, cfg.eval.bpb_tokens, cfg.eval.batch_size, seq_len)
        core = core_on_pool(pool, bundle, cfg.eval.core_max_per_task)
        totals = ray.get(bpb_ref)
    if totals["bytes"] == 0:
        raise UserError("the validation stream gave no tokens: check the validation shard")
    bpb = totals["nats"] / (math.log(2) * totals["bytes"])

    results = {"source": args.source, "run": cfg.run.name, "step": meta.get("step"), "val_bpb": bpb,
               "val_tokens": totals["tokens"], "val_bytes": totals["bytes"], "core_metric": core["core"],
               "core": core, "core_max_per_task": cfg.eval.core_max_per_task, "bundle": str(bundle),
               "preset": cfg.preset, "seconds": round(time.time() - started, 1)}
    csv_path, json_path = write_results(results, report_dir())
    print(format_table(core))
    print(f"val bpb {bpb:.4f}  ({totals['tokens']:,} tokens, {totals['bytes']:,} bytes)")
    print(f"wrote {csv_path} and {json_path} in {results['seconds']:.0f}s")
    return 0
