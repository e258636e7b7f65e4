"""Rollout actors: the policy's copy that samples answers for RL, on its own GPU (CPU locally).

An actor is a model-pool worker (raychat.pool) holding the Engine and the weights of one version. For
a chunk of questions, a sampling seed and the oldest weight version the learner accepts, it samples
`num_samples` replies per question with the calculator live, grades each with the task's reward, and
returns per sample the token ids (prompt + reply, the terminal token included when the reply stopped),
a mask (1 = sampled; 0 = prompt and the calculator's forced output), the log-probability of every
token under the weights that sampled it, the reward, and timings.

The log-probabilities are not collected while sampling (the engine samples at a temperature, with
top-k): they are recomputed afterwards in one teacher-forced pass of the same GPT code the learner runs,
so the actor's and the learner's numbers agree (exactly in fp32) and the difference the learner logs
measures only staleness and precision.

Weights arrive with a version (`set_weights` from the object store, or `receive_weights` by broadcast,
weight_sync.py); a chunk that asks for a newer version than the actor
holds is refused (`StaleWeights`), so no reply is ever sampled from weights older than the learner
allows (rl.max_staleness).
"""
from __future__ import annotations

import hashlib
import time

import torch

from raychat.engine import Engine, derive_seed
from raychat.model import autocast_context
from raychat.pool import ModelWorker
from raychat.rl.weight_sync import WeightReceiver
from raychat.train.step import pad_rows


class StaleWeights(RuntimeError):
    pass


def weights_checksum(model) -> str:
    """sha256 over every tensor of the state dict (names and fp32 bytes), to compare two copies."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def token_logprobs(model, sequences: list[list[int]], device: str) -> list[list[float]]:
    """log p(token t | tokens < t) for t = 1..len-1 of each sequence, with the training forward's own loss
    path (softcapped logits, chunked cross-entropy): logprob = -loss."""
    if not sequences:
        return []
    inputs, targets = pad_rows([s[:-1] for s in sequences], 0), pad_rows([s[1:] for s in sequences], -1)
    losses = model(inputs.to(device), targets.to(device), loss_reduction="none").float().cpu()
    return [(-losses[row, :len(s) - 1]).tolist() for row, s in enumerate(sequences)]


class RolloutWorker(WeightReceiver, ModelWorker):
    """A pool actor that samples and grades replies for RL (see the module docstring)."""

    def __init__(self, model, tokenizer, use_gpu: bool, task_spec: str, reference_path: str | None = None):
        super().__init__(model, tokenizer, use_gpu)
        self.task_spec = task_spec
        self.task = None
        self.version = 0
        self.reference = None   # the starting (SFT) policy, for the KL penalty: read from its checkpoint
        if reference_path is not None:
            from raychat.checkpoint import load_model
            self.reference, _ = load_model(reference_path, device=self.device)
            if self.device == "cpu":
                self.reference.float()
            self.reference.eval()

    def set_weights(self, version: int, state: dict) -> float:
        """Load the learner's weights of `version`; returns the seconds it took."""
        started = time.perf_counter()
        with torch.no_grad():
            self.model.load_state_dict({k: v.to(self.device) for k, v in state.items()})
        if self.device == "cpu":
            self.model.float()
        self.version = version
        return time.perf_counter() - started

    def checksum(self) -> tuple[int, str]:
        return self.version, weights_checksum(self.model)

    def rollout(self, chunk: dict) -> dict:
        """chunk: {"questions": [{"index", "prompt", "conversation"}], "num_samples", "max_tokens",
        "temperature", "top_k", "seed", "min_version"}."""
        from raychat.rl.tasks import build_rl_task
        if self.version < chunk["min_version"]:
            raise StaleWeights(f"actor holds weights version {self.version}, the learner needs >= "
                               f"{chunk['min_version']}")
        if self.task is None:  # the driver fetched the task's data already: nothing is downloaded here
            self.task = build_rl_task(self.task_spec, download=False)
        questions, n = chunk["questions"], chunk["num_samples"]
        started = time.perf_counter()
        with torch.inference_mode(), autocast_context(self.device):
            engine = Engine(self.model, self.tokenizer)
            sequences, masks = engine.generate_many(
                [q["prompt"] for q in questions], num_samples=n, max_tokens=chunk["max_tokens"],
                temperature=chunk["temperature"], top_k=chunk["top_k"] or None,
                seeds=[derive_seed(chunk["seed"], q["index"]) for q in questions], max_batch_size=max(n, len(questions) * n),
                include_stop=True)
            generated = time.perf_counter()
            logprobs = token_logprobs(self.model, sequences, self.device)
            reference = token_logprobs(self.reference, sequences, self.device) if self.reference is not None else None
        stop_tokens = engine.stop_tokens
        samples = []
        for i, (sequence, mask, lp) in enumerate(zip(sequences, masks, logprobs)):
            question = questions[i // n]
            reply = sequence[len(question["prompt"]):]
            text = self.tokenizer.decode([t for t in reply if t not in stop_tokens])
            samples.append({"question": question["index"], "ids": sequence, "mask": mask, "logprobs": lp,
                            "reward": float(self.task.reward(question["conversation"], text)),
                            "reply_tokens": sum(mask), "tool_calls": text.count("<|python_start|>")})
            if reference is not None:
                samples[-1]["ref_logprobs"] = reference[i]
        return {"samples": samples, "version": self.version, "generate_s": generated - started,
                "logprob_s": time.perf_counter() - generated,
                "tokens": sum(len(s["ids"]) - len(questions[i // n]["prompt"]) for i, s in enumerate(samples))}
