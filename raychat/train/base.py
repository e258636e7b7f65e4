"""Pretraining (`raychat train base`): the base model, from random weights, on FineWeb-EDU.

The stage spec for the shared loop (stage.py): a fresh model of `pretrain.depth`; a horizon of
`target_param_data_ratio` tokens per parameter (20, Chinchilla) or `num_iterations` steps; the packed,
resumable FineWeb-EDU stream (data/pretrain.py); validation bits-per-byte with greedy samples of fixed
prompts, and CORE on rank 0.

The driver's preflight fetches everything first: the shards (budgeted with the cropped fraction of
best-fit packing, measured on the actual tokenizer and shards), the validation shard and, when
`core_every > 0`, the CORE bundle; so no worker downloads anything mid-run.
"""
from __future__ import annotations

from pathlib import Path

import torch

from raychat.common import UserError, get_logger
from raychat.train.stage import Evaluation, Horizon, ModelStart, RunContext, Stage

log = get_logger("raychat.train")

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:"]


def plan_horizon(train_cfg, world_size: int, num_params: int | None = None, ratio: float | None = None) -> Horizon:
    """Micro-batches and steps from the preset: each worker runs device_batch_size rows of sequence_len per
    micro-step (split into `memory_split` smaller micro-batches when memory is short), accumulated to
    total_batch_size tokens; a clear error when the numbers do not divide."""
    rows, split = train_cfg.device_batch_size, train_cfg.memory_split
    if rows % split:
        raise UserError(f"memory_split ({split}) must divide device_batch_size ({rows}): each micro-batch holds "
                        f"device_batch_size / memory_split rows")
    micro_tokens = rows * train_cfg.sequence_len * world_size
    if train_cfg.total_batch_size % micro_tokens:
        raise UserError(
            f"total_batch_size ({train_cfg.total_batch_size:,} tokens) must be a multiple of device_batch_size x "
            f"sequence_len x num_workers = {rows} x {train_cfg.sequence_len} x {world_size} = {micro_tokens:,}")
    grad_accum = train_cfg.total_batch_size // micro_tokens * split
    if train_cfg.num_iterations > 0:
        iterations = train_cfg.num_iterations
    elif num_params and ratio:
        iterations = max(1, round(ratio * num_params / train_cfg.total_batch_size))
    else:
        raise UserError("set num_iterations or a tokens-per-parameter ratio: the horizon is undefined")
    return Horizon(iterations, grad_accum, rows // split, train_cfg.total_batch_size)


def plan_data(cfg, tokenizer, tokens: int) -> dict:
    """Fetch the shards `tokens` need, budgeted with the measured cropped fraction and chars/token;
    offline (RAYCHAT_DATA_DIR) the local shards are what there is: say how many epochs they give."""
    from raychat.data.fineweb import CHARS_PER_SHARD, download_shards, local_shard_dir, num_train_shards, shard_paths
    from raychat.data.pretrain import measure_packing
    d, tc = cfg.data, cfg.pretrain
    if local_shard_dir() is None:
        download_shards(cfg, 1)   # the first train shard (and the validation shard) to measure on
    first = shard_paths(cfg, "train", download=False)[:1]
    packing = measure_packing(tokenizer, first, d.packing, tc.sequence_len, d.buffer_docs)
    num_shards = num_train_shards(cfg, tokens, packing["chars_per_token"], packing["cropped_fraction"])
    if local_shard_dir() is None:
        download_shards(cfg, num_shards)
    paths = shard_paths(cfg, "train", download=False)
    shard_paths(cfg, "val", download=False)   # must exist too
    chars = len(paths) * CHARS_PER_SHARD if local_shard_dir() is None else _corpus_chars(paths)
    usable = chars / packing["chars_per_token"] * (1 - packing["cropped_fraction"])
    epochs = tokens / usable if usable else float("inf")
    if epochs > 1.0:
        log.warning(f"the {len(paths)} train shard(s) hold about {usable:,.0f} usable tokens after "
                    f"{100 * packing['cropped_fraction']:.0f}% cropping, the run needs {tokens:,}: "
                    f"the stream will repeat its documents ({epochs:.1f} epochs)")
    return {"num_shards": len(paths), "cropped_fraction": packing["cropped_fraction"],
            "chars_per_token": packing["chars_per_token"], "epochs": epochs}


def _corpus_chars(paths: list[Path]) -> int:
    from raychat.data.fineweb import iter_documents
    return sum(len(text) for text in iter_documents(paths))


class BaseStage(Stage):
    name, section_name = "base", "pretrain"

    def model_config(self, tokenizer):
        from raychat.model import GPTConfig
        tc = self.section
        return GPTConfig(depth=tc.depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=tc.max_seq_len)

    def preflight(self) -> dict:
        from raychat.model import GPT
        from raychat.tokenizer import get_tokenizer
        tc = self.section
        tokenizer = get_tokenizer()
        with torch.device("meta"):
            num_params = GPT(self.model_config(tokenizer)).num_params()
        horizon = self.horizon(tc.num_workers, num_params)
        plan = {"num_params": num_params, "num_iterations": horizon.num_iterations,
                "grad_accum_steps": horizon.grad_accum_steps, "micro_batch_size": horizon.micro_batch_size}
        plan.update(plan_data(self.cfg, tokenizer, horizon.num_iterations * horizon.tokens_per_step))
        if tc.core_every > 0:
            from raychat.eval.core import locate_bundle
            plan["core_bundle"] = str(locate_bundle(self.cfg))
        return plan

    def describe(self, plan: dict) -> str:
        return (f"{plan['num_params']:,} parameters, {plan['num_iterations']} steps, {plan['num_shards']} train "
                f"shard(s) ({100 * plan['cropped_fraction']:.0f}% of tokens cropped by packing, "
                f"{plan['epochs']:.2f} epochs)")

    def build_model(self, tokenizer, device: str) -> ModelStart:
        from raychat.model import build_model
        return ModelStart(build_model(self.model_config(tokenizer), device))

    def horizon(self, world: int, num_params: int) -> Horizon:
        return plan_horizon(self.section, world, num_params, self.section.target_param_data_ratio)

    def train_data(self, tokenizer, rank: int, world: int, micro_batch_size: int, cursor: dict | None):
        from raychat.data.pretrain import PretrainStream
        return PretrainStream(self.cfg, tokenizer, "train", micro_batch_size, self.section.sequence_len, rank=rank,
                              world_size=world, cursor=cursor, use_ray=self.plan.get("ray_data", False),
                              download=False)

    def evaluations(self) -> list[Evaluation]:
        tc = self.section
        evaluations = [Evaluation("val_bpb", tc.eval_every, self.validation_bpb)]
        if tc.core_every > 0:
            evaluations.append(Evaluation("core", tc.core_every, self.core))
        return evaluations

    def validation_bpb(self, ctx: RunContext, step: int) -> dict:
        """Bits per byte on the same validation rows at every evaluation (each rank its share), then
        greedy samples of fixed prompts on rank 0."""
        from raychat.data.pretrain import PretrainStream
        from raychat.eval.bpb import evaluate_bpb, limit_tokens
        from raychat.train.loop import log_samples
        tc = self.section
        if "val" not in ctx.state:
            stream = PretrainStream(self.cfg, ctx.tokenizer, "val", tc.device_batch_size // tc.memory_split,
                                    tc.sequence_len, rank=ctx.rank, world_size=ctx.world, use_ray=False, download=False)
            ctx.state["val"] = list(limit_tokens(stream, max(1, tc.eval_tokens // ctx.world)))
        with ctx.backend.autocast:
            bpb = evaluate_bpb(ctx.model, iter(ctx.state["val"]), ctx.tokenizer.token_bytes, distributed=ctx.world > 1)
        if ctx.rank == 0:
            bos = ctx.tokenizer.get_bos_token_id()
            log_samples(ctx, [ctx.tokenizer.encode(p, prepend=bos) for p in SAMPLE_PROMPTS], step)
        return {"val_bpb": bpb}

    def core(self, ctx: RunContext, step: int) -> dict:
        """CORE on rank 0 while the others wait (in-process: no Ray inside the step loop)."""
        score = {}
        if ctx.rank == 0:
            from raychat.eval.core import evaluate_core
            with ctx.backend.autocast:
                result = evaluate_core(ctx.model, ctx.tokenizer, self.cfg, self.section.core_max_per_task, ctx.device,
                                       bundle=Path(self.plan["core_bundle"]))
            score = {"core": result["core"]}
        if ctx.world > 1:
            torch.distributed.barrier()
        return score
