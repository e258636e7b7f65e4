"""Mid-training (`raychat train mid`): the base model learns conversations, tools and multiple choice.

nanochat's recipe: from the latest base checkpoint, one epoch of a mixture of SmolTalk (general chat),
MMLU auxiliary_train (multiple choice: answer with a letter), GSM8K (math with calculator calls),
identity conversations (who the model is) and spelling tasks, at pretraining's learning rates with the
last 20% decaying to 0. Conversations are packed whole into BOS-aligned rows of `sequence_len` tokens and
the loss is on every token, so the model learns the whole chat format (data/chat.py, `pack`).

The horizon is one epoch, counted exactly in the driver: every conversation of the mixture is rendered
once (in Ray tasks when Ray is up) and each rank's share is packed by the same best-fit packer the
workers run, from lengths alone; the epoch ends with the rank whose share fills the fewest steps.
"""
from __future__ import annotations

import dataclasses
import os

from raychat.common import UserError, get_logger
from raychat.train.base import plan_horizon
from raychat.train.chat import ChatStage
from raychat.train.stage import Horizon

log = get_logger("raychat.train")

VAL_MIXTURE = "smoltalk-test,mmlu:5200,gsm8k-test:420"   # nanochat's held-out mix
LENGTH_TASK_SIZE = 5_000                                   # conversations rendered per Ray task


def _render_lengths(spec: str, seed: int, tokenizer, start: int, stop: int, env: dict | None = None) -> list[int]:
    from raychat.tasks.mixture import build_mixture
    os.environ.update(env or {})   # a Ray worker may predate the driver's RAYCHAT_BASE_DIR / RAYCHAT_DATA_DIR
    mixture = build_mixture(spec, seed, download=False)
    return [len(tokenizer.render_conversation(mixture[i], max_tokens=2**62)[0]) for i in range(start, stop)]


def mixture_lengths(spec: str, seed: int, tokenizer, size: int) -> list[int]:
    """Token length of every conversation of the mixture, in mixture order: in parallel Ray tasks when
    Ray is running (nanochat's d20 mixture has 850k conversations), in this process otherwise."""
    import ray
    chunks = [(start, min(start + LENGTH_TASK_SIZE, size)) for start in range(0, size, LENGTH_TASK_SIZE)]
    if not ray.is_initialized() or len(chunks) < 2:
        return _render_lengths(spec, seed, tokenizer, 0, size)
    task = ray.remote(_render_lengths)
    tokenizer_ref = ray.put(tokenizer)
    env = {k: os.environ[k] for k in ("RAYCHAT_BASE_DIR", "RAYCHAT_DATA_DIR") if k in os.environ}
    return [n for part in ray.get([task.remote(spec, seed, tokenizer_ref, a, b, env) for a, b in chunks])
            for n in part]


class MidStage(ChatStage):
    name, section_name, mode = "mid", "midtrain", "pack"
    val_mixture = VAL_MIXTURE

    def parent_stage(self) -> str:
        return "base"

    def shape(self, world: int) -> Horizon:
        """Rows per micro-batch and micro-batches per step (from the batch settings; steps come later)."""
        return plan_horizon(dataclasses.replace(self.section, num_iterations=1), world)

    def preflight(self) -> dict:
        from raychat.data.chat import count_packed_rows, rank_share
        from raychat.tokenizer import get_tokenizer
        s = self.section
        tokenizer = get_tokenizer()
        self.check_parent(tokenizer)
        mixture = self.mixture(s.mixture, download=True)
        self.mixture(self.val_mixture, download=True, field="validation mixture")
        shape = self.shape(s.num_workers)
        lengths = mixture_lengths(s.mixture, self.cfg.run.seed, tokenizer, len(mixture))
        rows_per_step = shape.micro_batch_size * shape.grad_accum_steps
        rows, dropped = zip(*(count_packed_rows([lengths[i] for i in rank_share(len(lengths), r, s.num_workers)],
                                                s.sequence_len + 1) for r in range(s.num_workers)))
        epoch_steps = min(rows) // rows_per_step
        if epoch_steps == 0 and s.num_iterations <= 0:
            raise UserError(f"one epoch of midtrain.mixture packs {min(rows)} rows per worker, fewer than one step "
                            f"({rows_per_step} rows): use a larger mixture or a smaller midtrain.total_batch_size")
        return {"parent": self.parent(), "conversations": len(mixture), "tasks": mixture.describe(),
                "tokens": sum(lengths), "dropped": sum(dropped), "epoch_steps": epoch_steps,
                "num_iterations": s.num_iterations if s.num_iterations > 0 else epoch_steps}

    def describe(self, plan: dict) -> str:
        p = plan["parent"]
        return (f"from {p['stage']}/{p['run']} step {p['step']}; {plan['conversations']:,} conversations "
                f"({plan['tokens']:,} tokens; {plan['dropped']} longer than a row, dropped), "
                f"{plan['num_iterations']} steps (one epoch = {plan['epoch_steps']})")

    def horizon(self, world: int, num_params: int) -> Horizon:
        return dataclasses.replace(self.shape(world), num_iterations=self.plan["num_iterations"])
