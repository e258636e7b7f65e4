"""What a training stage tells the shared loop: the `Stage` interface, and the registry of stages.

The loop (loop.py) owns everything stages have in common: resume, the step, metrics, ETA, TensorBoard,
checkpoints, fault injection, reporting. A stage (base.py for pretraining; mid-training, SFT and the RL
learner next) is a small class that supplies only what differs:

- `name` and `section`: the checkpoint/TensorBoard directory name and its config section (a
  `TrainConfig`: batch sizes, learning rates, workers, cadences);
- `preflight()`, in the driver: fetch everything the workers will need (shards, tokenizer, eval bundles,
  the parent checkpoint) and return a JSON-able `plan` that every worker receives; workers download nothing;
- `build_model()`: fresh from the depth, or the weights of a parent stage's checkpoint;
- `horizon()` / `schedule()`: how many steps (tokens, conversations, epochs or RL steps) and the LR schedule;
- `train_data()`: an iterator of micro-batches with `state_dict()` (an exact resume cursor) and
  optionally `stats()` (epoch, cropped_fraction, wait_s; logged at every log line);
- `evaluations()`: what to measure, and how often;
- `loss_fn` (default: summed cross-entropy of the supervised tokens), `loss_normalizer` (default: the
  supervised tokens; what the step's loss sum is divided by) and `after_step()` (RL weight sync).

Stages travel to Ray workers by name (`STAGES`) with the config and the plan, never as pickled objects.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from raychat.common import UserError
from raychat.train.step import Schedule, supervised_tokens, token_loss_sum

STAGES = {
    "base": "raychat.train.base:BaseStage",
    "mid": "raychat.train.mid:MidStage",
    "sft": "raychat.train.sft:SFTStage",
    "rl": "raychat.rl.stage:RLStage",
}


@dataclass
class Horizon:
    num_iterations: int
    grad_accum_steps: int        # micro-batches per step on each rank
    micro_batch_size: int        # rows per micro-batch
    tokens_per_step: int         # rows x sequence length x micro-batches x ranks (upper bound for padded data)


@dataclass
class ModelStart:
    """The model a run starts from, and what the checkpoint meta records about where it came from."""
    model: object
    parent: dict | None = None   # {"stage", "run", "step", "path", "weights_sha256"} for a fine-tuning stage


@dataclass
class Evaluation:
    """`run(ctx, step) -> {metric: value}`, called on every rank at every `every` steps (0 = never during
    the run) and after the last step when `at_end`."""
    name: str
    every: int
    run: Callable
    at_end: bool = True

    def due(self, step: int, last: bool) -> bool:
        return (last and self.at_end) or (self.every > 0 and step % self.every == 0)


@dataclass
class RunContext:
    """What evaluations and hooks of a stage get from the loop on each rank."""
    cfg: object
    model: object
    tokenizer: object
    backend: object
    rank: int
    world: int
    device: str
    writer: object = None    # TensorBoard SummaryWriter on rank 0, None elsewhere
    state: dict = field(default_factory=dict)   # a stage's own per-run state (validation batches, ...)


class Stage:
    name = ""            # checkpoints/{name}/{run}, tb/{name}/{run}, report/{name}_train.json
    section_name = ""    # the config section with this stage's TrainConfig (pretrain, midtrain, sft)
    loss_fn = staticmethod(token_loss_sum)
    loss_normalizer = staticmethod(supervised_tokens)

    def __init__(self, cfg, plan: dict | None = None):
        self.cfg = cfg
        self.plan = plan or {}

    @property
    def section(self):
        return getattr(self.cfg, self.section_name)

    # -- driver ---------------------------------------------------------------------------------------
    def preflight(self) -> dict:
        raise NotImplementedError

    def describe(self, plan: dict) -> str:
        return f"{self.name}: {plan}"

    # -- workers (and the driver's resume check) --------------------------------------------------------
    def model_config(self, tokenizer):
        """The GPTConfig this stage trains (from the depth, or from the parent checkpoint)."""
        raise NotImplementedError

    def build_model(self, tokenizer, device: str) -> ModelStart:
        raise NotImplementedError

    def horizon(self, world: int, num_params: int) -> Horizon:
        raise NotImplementedError

    def schedule(self, horizon: Horizon) -> Schedule:
        s = self.section
        return Schedule(horizon.num_iterations, s.warmup_ratio, s.warmdown_ratio, s.final_lr_frac)

    def train_data(self, tokenizer, rank: int, world: int, micro_batch_size: int, cursor: dict | None):
        raise NotImplementedError

    def evaluations(self) -> list[Evaluation]:
        return []

    def wrap_warning(self, epoch: int, step: int, horizon: Horizon) -> str | None:
        """What the loop warns when the training data enters epoch `epoch` (0-based) at `step`; None when
        the stage planned it (SFT's num_epochs)."""
        return (f"the training data wrapped into epoch {epoch + 1} at step {step} "
                f"({100 * step / horizon.num_iterations:.0f}% of the run): the shards hold fewer tokens than the "
                f"horizon needs, so documents repeat; fetch more shards (data.num_shards) or shorten the run")

    def after_step(self, ctx: RunContext, step: int, result) -> None:
        """Called on every rank after each optimizer step (RL: publish the new weights)."""

    def learner_gpus(self) -> float:
        """GPUs per training worker (RL's colocated placement shares them with rollout actors)."""
        return 1.0


def make_stage(name: str, cfg, plan: dict | None = None) -> Stage:
    if name not in STAGES:
        raise UserError(f"unknown training stage '{name}': choose one of {', '.join(STAGES)}")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, plan)

