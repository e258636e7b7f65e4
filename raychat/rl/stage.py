"""RL (`raychat train rl`): the learner is the shared trainer (Ray Train + DeepSpeed workers, the shared
step and loop); generation runs on rollout actors beside it (rollout.py), so each side scales on its own.

Per batch of rollouts (one per step; `rl.ppo_epochs` steps with PPO's clipped loss, loss.py), each
learner rank takes its share of the batch's questions (a fixed shuffle of the task, so the
position in it is the whole data cursor and resume is exact), has its rollout actors sample
`rl.num_samples` replies to each (one question per chunk, on whichever actor is free; an actor that dies
is replaced and its questions sampled again, none lost or counted twice), turns rewards into advantages
(advantage.py) and trains on the replies. After the update, `after_step` publishes the new weights as
version k+1 to the rank's actors (a broadcast in their own process group, or the object store:
weight_sync.py). With `rl.max_staleness` 1 the rollouts of
step k+1 are dispatched before step k is learned, with weights one version old, so generation and
learning overlap; with 0 (the default) every reply comes from the weights being trained.

Logged per step (TensorBoard `rl/`): mean reward, reply length, tool calls, groups without signal, sync
seconds, rollout tokens/s, and the gap between the actors' log-probabilities and the learner's own for
the same tokens (0 up to precision when on-policy). pass@k on the task's test questions every
`rl.eval_every` steps and at the end.
"""
from __future__ import annotations

import random
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from raychat.common import UserError, get_logger
from raychat.train.chat import ChatStage
from raychat.train.stage import Evaluation, Horizon, ModelStart, RunContext
from raychat.train.step import Schedule

log = get_logger("raychat.train")


class RLStage(ChatStage):
    name, section_name = "rl", "rl"

    def __init__(self, cfg, plan: dict | None = None):
        super().__init__(cfg, plan)
        s = self.section
        if s.ppo_epochs > 1 or s.kl_coef > 0:   # otherwise the shared step's weighted cross-entropy is the loss
            from raychat.rl.loss import policy_loss
            self.loss_fn = policy_loss(s.clip_eps, s.kl_coef)
        if s.advantage == "drgrpo":
            self.loss_normalizer = self.reply_budget

    def reply_budget(self, batches) -> int:
        """Dr. GRPO's constant normaliser: every reply counts as rl.max_new_tokens tokens (one row = one reply)."""
        return sum(b.inputs.shape[0] for b in batches) * self.section.max_new_tokens

    def parent_stage(self) -> str:
        return self.section.source

    # -- driver -----------------------------------------------------------------------------------------
    def preflight(self) -> dict:
        from raychat.rl.tasks import build_rl_task
        from raychat.tokenizer import get_tokenizer
        s = self.section
        self.check_parent(get_tokenizer())
        self.check_placement()
        questions = len(build_rl_task(s.task, "train", download=True))
        build_rl_task(s.task, "test", download=True)
        self.plan = {**self.plan, "parent": self.parent(), "questions": questions}
        return {**self.plan, "num_iterations": self.horizon(s.num_workers, 0).num_iterations}

    def describe(self, plan: dict) -> str:
        p, s = plan["parent"], self.section
        return (f"from {p['stage']}/{p['run']} step {p['step']}; {s.task}: {plan['questions']:,} questions, "
                f"{plan['num_iterations']} steps of {s.examples_per_step} questions x {s.num_samples} replies on "
                f"{s.num_rollout_actors} rollout actors ({s.placement}, max staleness {s.max_staleness})")

    def check_placement(self) -> None:
        """Enough GPUs for the learners and the actors, before anything starts."""
        import ray
        s = self.section
        if not s.use_gpu:
            return
        gpus = int(ray.cluster_resources().get("GPU", 0))
        need = s.num_workers + s.num_rollout_actors if s.placement == "split" else max(s.num_workers, s.num_rollout_actors)
        if gpus < need:
            raise UserError(f"rl.placement={s.placement} with {s.num_workers} learners and {s.num_rollout_actors} "
                            f"rollout actors needs {need} GPUs; the cluster has {gpus}: lower rl.num_rollout_actors "
                            f"or use rl.placement=colocated")

    def actor_gpus(self) -> float:
        """GPU share of one rollout actor (split: a whole GPU; colocated: half of a learner's)."""
        return 0.0 if not self.section.use_gpu else (1.0 if self.section.placement == "split" else 0.5)

    def learner_gpus(self) -> float:
        return 1.0 if self.section.placement == "split" else 0.5

    # -- horizon ----------------------------------------------------------------------------------------
    def horizon(self, world: int, num_params: int) -> Horizon:
        s = self.section
        if s.examples_per_step % world:
            raise UserError(f"rl.examples_per_step ({s.examples_per_step}) must be a multiple of rl.num_workers ({world})")
        rows = s.examples_per_step // world * s.num_samples
        if rows % s.device_batch_size:
            raise UserError(f"each worker trains on rl.examples_per_step / num_workers x rl.num_samples = {rows} "
                            f"replies per step, which rl.device_batch_size ({s.device_batch_size}) must divide")
        steps = s.num_iterations
        if steps <= 0:   # one update per batch of rollouts, ppo_epochs with PPO
            steps = self.plan["questions"] * s.num_epochs // s.examples_per_step * s.ppo_epochs
            if steps == 0:
                raise UserError(f"{s.task} has {self.plan['questions']} questions, fewer than one step "
                                f"({s.examples_per_step}): lower rl.examples_per_step")
        return Horizon(steps, rows // s.device_batch_size, s.device_batch_size,
                       s.examples_per_step * s.num_samples * s.sequence_len)

    def schedule(self, horizon: Horizon) -> Schedule:
        s = self.section
        return Schedule(horizon.num_iterations, s.warmup_ratio, s.warmdown_ratio, s.final_lr_frac,
                        initial_lr_frac=s.init_lr_frac)

    # -- workers ----------------------------------------------------------------------------------------
    def build_model(self, tokenizer, device: str) -> ModelStart:
        start = super().build_model(tokenizer, device)
        self.model = start.model   # the stream publishes these weights (restored in place on resume)
        return start

    def train_data(self, tokenizer, rank: int, world: int, micro_batch_size: int, cursor: dict | None):
        self.stream = RolloutStream(self, tokenizer, rank, world, micro_batch_size, cursor)
        return self.stream

    def after_step(self, ctx: RunContext, step: int, result) -> None:
        stats = self.stream.publish(step + 1)
        if ctx.rank == 0:
            line = " | ".join(f"{k} {v:.4g}" for k, v in stats.items())
            if (step + 1) % self.section.log_every == 0 or step + 1 == self.stream.horizon_steps:
                log.info(f"step {step + 1:05d} rl | {line}")
            for key, value in stats.items():
                ctx.writer.add_scalar(f"rl/{key}", value, step + 1)

    def evaluations(self) -> list[Evaluation]:
        return [Evaluation("pass_at_k", self.section.eval_every, self.pass_at_k)]

    def pass_at_k(self, ctx: RunContext, step: int) -> dict:
        """pass@1..K on the task's first `rl.eval_problems` test questions, sampled by rank 0's actors."""
        from raychat.eval.chat import pass_at_k
        if ctx.rank != 0:
            return {}
        s = self.section
        results = self.stream.sample(self.stream.test_task, range(min(s.eval_problems, len(self.stream.test_task))),
                                     s.eval_samples, seed=10**6 + step, min_version=step)
        groups = [[smp["reward"] > 0 for smp in r["samples"]] for r in results]
        return {f"pass@{k}": sum(pass_at_k(len(g), sum(g), k) for g in groups) / len(groups)
                for k in range(1, s.eval_samples + 1)}


class RolloutStream:
    """The RL learner's training data on one rank: micro-batches of graded replies from the rollout actors."""

    def __init__(self, stage: RLStage, tokenizer, rank: int, world: int, rows_per_batch: int, cursor: dict | None):
        from raychat.rl.tasks import build_rl_task
        s = stage.section
        self.stage, self.section, self.tokenizer = stage, s, tokenizer
        self.rank, self.world, self.rows_per_batch = rank, world, rows_per_batch
        self.task = build_rl_task(s.task, "train", download=False)
        self.test_task = build_rl_task(s.task, "test", download=False)
        self.order = list(range(len(self.task)))
        random.Random(stage.cfg.run.seed).shuffle(self.order)
        self.step = (cursor or {}).get("step", 0)   # the next step whose replies this stream produces
        self.version = self.step                     # weights version = optimizer steps taken
        self.horizon_steps = stage.horizon(world, 0).num_iterations
        self.pool, self.publisher = None, None
        self.batches = None                          # the current rollouts' micro-batches (PPO epochs reuse them)
        self.queue: deque = deque()
        self.ahead = None                            # (step, future) of rollouts dispatched one step early
        self.executor = ThreadPoolExecutor(1) if s.max_staleness else None
        self.step_stats: dict = {}

    # -- actors and weights -----------------------------------------------------------------------------
    def _start_pool(self) -> None:
        from raychat.common import checkpoint_dir
        from raychat.pool import ModelPool
        from raychat.rl.rollout import RolloutWorker
        from raychat.rl.weight_sync import WeightPublisher, choose_weight_sync
        s = self.section
        per_rank = max(1, s.num_rollout_actors // self.world)
        reference = self.stage.parent()["path"] if s.kl_coef > 0 else None
        self.pool = ModelPool(RolloutWorker, self._policy_copy(), self.tokenizer, per_rank, s.use_gpu, s.task,
                              reference, num_gpus=self.stage.actor_gpus())
        method = choose_weight_sync(s.weight_sync, s.use_gpu, s.placement)
        run = self.stage.cfg.run
        store_dir = checkpoint_dir(self.stage.name, run.name, run.storage_path) / ".weight_sync"
        self.publisher = WeightPublisher(method, self.pool, store_dir, next(self.stage.model.parameters()).device)
        self.publisher.publish(self.stage.model, self.version)

    def _policy_copy(self):
        """A plain CPU copy of the learner's model for the actors (the learner's own object holds references
        to its process group and optimizer, which cannot be pickled)."""
        from raychat.model import build_model
        from raychat.rl.weight_sync import cpu_state
        copy = build_model(self.stage.model.config, device="cpu", init=False)
        copy.load_state_dict(cpu_state(self.stage.model))
        return copy.eval()

    def publish(self, version: int) -> dict:
        """After an optimizer step: the actors get the new weights; returns the step's statistics."""
        self.version = version
        self.step_stats.update(self.publisher.publish(self.stage.model, version))
        return dict(self.step_stats)

    # -- sampling ---------------------------------------------------------------------------------------
    def questions(self, batch: int) -> list[int]:
        per_rank = self.section.examples_per_step // self.world
        first = batch * self.section.examples_per_step + self.rank * per_rank
        return [self.order[(first + j) % len(self.order)] for j in range(per_rank)]

    def sample(self, task, indices, num_samples: int, seed: int, min_version: int) -> list[dict]:
        """One chunk per question, on whichever actor is free; the results in question order."""
        s = self.section
        chunks = []
        for index in indices:
            conversation = task.question(index)
            prompt = self.tokenizer.render_for_completion(conversation)
            chunks.append({"questions": [{"index": index, "prompt": prompt, "conversation": conversation}],
                           "num_samples": num_samples, "max_tokens": s.max_new_tokens, "temperature": s.temperature,
                           "top_k": s.top_k, "seed": seed, "min_version": min_version})
        return self.pool.map("rollout", chunks)

    def _rollouts(self, batch: int):
        """Rollout batch `batch` (used by steps batch x ppo_epochs ...), sampled with weights no older than
        rl.max_staleness versions before its first step."""
        s = self.section
        return self.sample(self.task, self.questions(batch), s.num_samples, seed=self.stage.cfg.run.seed * 10**6 + batch,
                           min_version=batch * s.ppo_epochs - s.max_staleness)

    def _fill(self) -> None:
        from raychat.rl.advantage import micro_batches, sample_rows
        epochs = self.section.ppo_epochs
        if self.pool is None:
            self._start_pool()
        batch = self.step // epochs
        if self.step % epochs == 0 or self.batches is None:   # a new batch of rollouts (else PPO reuses it)
            started = time.perf_counter()
            if self.ahead is not None and self.ahead[0] == batch:
                results = self.ahead[1].result()
            else:
                results = self._rollouts(batch)
            samples = [sample for r in results for sample in r["samples"]]
            rows, stats = sample_rows(samples, self.section.num_samples, self.section.advantage)
            self.batches = micro_batches(rows, self.rows_per_batch)
            self.step_stats = {**stats, **self._rollout_stats(results, samples, time.perf_counter() - started)}
        # with max_staleness 1 the next batch is sampled during this batch's last update, by weights one
        # version older than the step that will learn from it
        if self.executor is not None and self.step % epochs == epochs - 1 and (batch + 1) * epochs < self.horizon_steps:
            self.ahead = (batch + 1, self.executor.submit(self._rollouts, batch + 1))
        self.queue.extend(self.batches)
        self.step += 1

    def _rollout_stats(self, results: list[dict], samples: list[dict], waited: float) -> dict:
        """Throughput, lag, restarts, and the learner's log-probabilities of a few replies against the
        actors' (staleness and precision)."""
        from raychat.rl.rollout import token_logprobs
        check = samples[:4]
        model = self.stage.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            mine = token_logprobs(model, [smp["ids"] for smp in check], next(model.parameters()).device)
        model.train(was_training)
        gaps = [abs(a - b) for smp, lp in zip(check, mine) for a, b, m in zip(smp["logprobs"], lp, smp["mask"][1:]) if m]
        generate_s = sum(r["generate_s"] for r in results)
        return {"rollout_wait_s": waited, "rollout_tokens_per_s": sum(r["tokens"] for r in results) / max(generate_s, 1e-9),
                "logprob_gap": sum(gaps) / max(1, len(gaps)), "weights_lag": self.version - min(r["version"] for r in results),
                "actor_restarts": self.pool.restarts}

    def __iter__(self):
        return self

    def __next__(self):
        if not self.queue:
            self._fill()
        return self.queue.popleft()

    def state_dict(self) -> dict:
        return {"step": self.step}
