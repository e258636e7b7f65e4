"""What the two chat stages share (mid.py: mid-training, sft.py: supervised fine-tuning).

Both start from the latest complete checkpoint of a parent stage (base for mid; mid or base for SFT),
train on a task mixture through the conversation stream (data/chat.py), and measure bits-per-byte on
held-out conversations, followed by greedy chat samples on rank 0, so the log shows whether the model
answers in the assistant turn and stops at <|assistant_end|>.

The driver's preflight finds and checks the parent (it exists, it was trained with this tokenizer, its
context covers the rows) and fetches every dataset the mixtures need (data/chat_data on RAYCHAT_BASE_DIR,
or the offline copies); the plan carries the parent's path, so the workers load exactly the checkpoint
the driver checked, and read only files that are already there.
"""
from __future__ import annotations

from raychat.checkpoint import MODEL_FILE, latest_checkpoint, load_model, read_meta
from raychat.common import UserError, checkpoint_dir
from raychat.train.stage import Evaluation, ModelStart, RunContext, Stage

CHAT_PROMPTS = ["Hello! Who are you?", "What is 12 times 7?", "Spell the word 'cat'.",
                "What is the capital of France?"]
SAMPLE_TOKENS = 32


class ChatStage(Stage):
    mode = ""            # the conversation stream's row making: "pack" (mid) or "pad" (SFT)
    val_mixture = ""     # held-out conversations for val bpb

    def parent_stage(self) -> str:
        raise NotImplementedError

    # -- the parent checkpoint --------------------------------------------------------------------------
    def parent(self) -> dict:
        """{"stage", "run", "step", "path", "weights_sha256"}: from the plan in the workers; in the driver,
        the parent stage's latest complete checkpoint (weights verified against their checksum)."""
        if "parent" in self.plan:
            return self.plan["parent"]
        if getattr(self, "_parent", None) is None:
            stage, run = self.parent_stage(), self.section.parent_run or self.cfg.run.name
            directory = checkpoint_dir(stage, run, self.cfg.run.storage_path)
            path = latest_checkpoint(directory, [MODEL_FILE])
            if path is None:
                raise UserError(f"{self.name} starts from a {stage} checkpoint, but there is no complete one in "
                                f"{directory}: run `raychat train {stage}` first (or set "
                                f"{self.section_name}.parent_run)")
            meta = read_meta(path)
            self._parent = {"stage": stage, "run": run, "step": meta.get("step"), "path": str(path),
                            "weights_sha256": meta["files"][MODEL_FILE]}
        return self._parent

    def model_config(self, tokenizer):
        from raychat.model import GPTConfig
        return GPTConfig.from_dict(read_meta(self.parent()["path"])["model_config"])

    def build_model(self, tokenizer, device: str) -> ModelStart:
        model, _ = load_model(self.parent()["path"], device=device)
        return ModelStart(model.train(), parent=dict(self.parent()))

    def check_parent(self, tokenizer) -> None:
        """The parent was trained with this tokenizer, and its context covers this stage's rows."""
        parent = self.parent()
        meta = read_meta(parent["path"])
        if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint():
            trained_with = str(meta.get("tokenizer_fingerprint"))[:12]
            raise UserError(f"{parent['path']} was trained with tokenizer {trained_with}, "
                            f"but the current tokenizer is {tokenizer.fingerprint()[:12]}: use the tokenizer it was "
                            f"trained with")
        context = self.model_config(tokenizer).sequence_len
        if self.section.sequence_len > context:
            raise UserError(f"{self.section_name}.sequence_len ({self.section.sequence_len}) is longer than the "
                            f"{parent['stage']} model's context ({context}): set {self.section_name}.sequence_len="
                            f"{context} or less")

    # -- data -------------------------------------------------------------------------------------------
    def mixture(self, spec: str, download: bool = False, field: str = ""):
        from raychat.tasks.mixture import build_mixture
        return build_mixture(spec, self.cfg.run.seed, download, field or f"{self.section_name}.mixture")

    def train_data(self, tokenizer, rank: int, world: int, micro_batch_size: int, cursor: dict | None):
        from raychat.data.chat import ConversationStream
        return ConversationStream(self.mixture(self.section.mixture), tokenizer, self.mode, micro_batch_size,
                                  self.section.sequence_len, rank, world, cursor)

    def wrap_warning(self, epoch: int, step: int, horizon) -> str | None:
        if epoch < getattr(self.section, "num_epochs", 1):   # SFT's planned passes
            return None
        return (f"{self.section_name}.mixture wrapped into pass {epoch + 1} at step {step} "
                f"({100 * step / horizon.num_iterations:.0f}% of the run): its conversations repeat; use a larger "
                f"mixture or fewer steps ({self.section_name}.num_iterations)")

    # -- evaluation -------------------------------------------------------------------------------------
    def evaluations(self) -> list[Evaluation]:
        return [Evaluation("val_bpb", self.section.eval_every, self.validation_bpb)]

    def validation_bpb(self, ctx: RunContext, step: int) -> dict:
        """Bits per byte on the same held-out conversations at every evaluation (each rank its share; the
        targets the stage trains on: every token for mid, the assistant's for SFT), then chat samples."""
        from raychat.data.chat import ConversationStream
        from raychat.eval.bpb import evaluate_bpb, limit_tokens
        from raychat.train.loop import log_samples
        section = self.section
        if "val" not in ctx.state:
            stream = ConversationStream(self.mixture(self.val_mixture, field="validation mixture"), ctx.tokenizer,
                                        self.mode, section.device_batch_size // section.memory_split,
                                        section.sequence_len, ctx.rank, ctx.world, loop=False)
            ctx.state["val"] = list(limit_tokens(stream, max(1, section.eval_tokens // ctx.world)))
            stream.close()
        with ctx.backend.autocast:
            bpb = evaluate_bpb(ctx.model, iter(ctx.state["val"]), ctx.tokenizer.token_bytes, distributed=ctx.world > 1)
        if ctx.rank == 0:
            prompts = [ctx.tokenizer.render_for_completion([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
            log_samples(ctx, prompts, step, max_tokens=SAMPLE_TOKENS)
        return {"val_bpb": bpb}
