"""Supervised fine-tuning (`raychat train sft`): the model learns to answer as the assistant.

nanochat's recipe: from the latest mid checkpoint (or base, `--set sft.source=base`), ARC-Easy and
ARC-Challenge train, GSM8K train, 10k SmolTalk conversations, identity and a little spelling; one
conversation per row, padded, and the loss only on what the assistant writes (data/chat.py, `pad`), so
the model is trained on answers, not on questions. The batch is counted in conversations
(`sft.total_batch_size` per step); the learning rates start at `init_lr_frac` (0.02) of the base ones
and decay linearly to 0 over `num_epochs` passes. A micro-batch whose assistant tokens were all cropped
has no target at all: the step's loss normalisation makes it contribute nothing (train/step.py).
"""
from __future__ import annotations

from raychat.common import UserError
from raychat.train.chat import ChatStage
from raychat.train.stage import Horizon
from raychat.train.step import Schedule

VAL_MIXTURE = "smoltalk-test"


class SFTStage(ChatStage):
    name, section_name, mode = "sft", "sft", "pad"
    val_mixture = VAL_MIXTURE

    def parent_stage(self) -> str:
        return self.section.source

    def preflight(self) -> dict:
        from raychat.tokenizer import get_tokenizer
        s = self.section
        self.check_parent(get_tokenizer())
        mixture = self.mixture(s.mixture, download=True)
        self.mixture(self.val_mixture, download=True, field="validation mixture")
        plan = {"parent": self.parent(), "conversations": len(mixture), "tasks": mixture.describe()}
        self.plan = {**self.plan, **plan}
        plan["num_iterations"] = self.horizon(s.num_workers, 0).num_iterations
        return plan

    def describe(self, plan: dict) -> str:
        p = plan["parent"]
        return (f"from {p['stage']}/{p['run']} step {p['step']}; {plan['conversations']:,} conversations, "
                f"{plan['num_iterations']} steps of {self.section.total_batch_size} conversations")

    def horizon(self, world: int, num_params: int) -> Horizon:
        """Conversations per step = total_batch_size, in micro-batches of device_batch_size / memory_split
        rows on each worker; as many steps as `num_epochs` passes over each worker's share give."""
        s = self.section
        if s.device_batch_size % s.memory_split:
            raise UserError(f"sft.memory_split ({s.memory_split}) must divide sft.device_batch_size "
                            f"({s.device_batch_size})")
        per_micro_step = s.device_batch_size * world
        if s.total_batch_size % per_micro_step:
            raise UserError(f"sft.total_batch_size ({s.total_batch_size} conversations) must be a multiple of "
                            f"sft.device_batch_size x num_workers = {s.device_batch_size} x {world} = {per_micro_step}")
        steps = s.num_iterations
        if steps <= 0:
            share = self.plan["conversations"] // world      # each worker's conversations per epoch
            steps = share * s.num_epochs // (s.total_batch_size // world)
            if steps == 0:
                raise UserError(f"sft.mixture has {self.plan['conversations']} conversations, fewer than one step "
                                f"({s.total_batch_size}): use a larger mixture or a smaller sft.total_batch_size")
        return Horizon(steps, s.total_batch_size // per_micro_step * s.memory_split,
                       s.device_batch_size // s.memory_split, s.total_batch_size * s.sequence_len)

    def schedule(self, horizon: Horizon) -> Schedule:
        s = self.section
        return Schedule(horizon.num_iterations, s.warmup_ratio, s.warmdown_ratio, s.final_lr_frac,
                        initial_lr_frac=s.init_lr_frac)
