"""Helpers for the serving tests: a tiny model, and the real chat deployment with faults injected.

`tiny_model` has the real architecture with random weights that make the output depend on the prompt
(nanochat's init zeroes the output projections, which would make every answer the same).

`InstrumentedChatService` is the real `ChatService` (same routes, scheduler, engine and tokenizer) whose
engine batch and tokenizer are wrapped so that a test can make them slow or make them fail: a request
chooses its fault by a marker word in its message (a test cannot otherwise reach into a replica). The
replica imports this module, so its runtime_env puts tests/ on PYTHONPATH (`instrumented_app`).
"""
import os
import socket
import time
from pathlib import Path

import torch

from raychat.model import GPTConfig, build_model
from serve.app import ChatService

TESTS = Path(__file__).resolve().parent
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# marker words (in a user message) and what they do
SLOW_TOKENIZE = "SLOWTOKENIZE"   # rendering the conversation takes `tokenize_delay_s`
SLOW_PREFILL = "SLOWPREFILL"     # the prefill takes `prefill_s_per_token` per prompt token
FAIL_PREFILL = "FAILPREFILL"     # the prefill raises
FAIL_STEP = "FAILSTEP"           # the batch's decode step raises `fail_after_steps` steps after this prefill
KILL_SCHEDULER = "KILLSCHEDULER"  # the same `kill_after_steps` steps after it, and rebuilding the batch fails
                                  # too: the scheduler thread dies


def tiny_model(tokenizer, depth: int = 2, sequence_len: int = 256, seed: int = 0):
    """A random model that depends on `seed` only (not on what ran before it in the session)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(GPTConfig(depth=depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=sequence_len))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def save_checkpoint(tokenizer, base: Path) -> Path:
    """A RAYCHAT_BASE_DIR holding the tokenizer and a tiny sft checkpoint."""
    from raychat.checkpoint import save_model
    tokenizer.save(base / "tokenizer")
    save_model(base / "checkpoints" / "sft" / "default" / "step_000000", tiny_model(tokenizer),
               {"step": 0, "tokenizer_fingerprint": tokenizer.fingerprint()})
    return base


def service_stats(url: str, headers: dict | None = None) -> dict:
    import httpx
    return httpx.get(f"{url}/stats", headers=headers, timeout=10).json()


def wait_idle(url: str, timeout: float = 10.0, headers: dict | None = None) -> dict:
    """The service's /stats once nothing is decoding or queued (or at the timeout, whichever comes first)."""
    deadline = time.time() + timeout
    while True:
        s = service_stats(url, headers)
        if (s["active_sequences"] == 0 and s["queued_sequences"] == 0) or time.time() > deadline:
            return s
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultyBatch:
    """An engine `Batch` (the real one does the work) with the injected delays and failures."""

    def __init__(self, batch, engine: "FaultyEngine"):
        self.batch, self.engine = batch, engine
        self.steps = 0
        self.fail_at_step: int | None = None  # counted in batch steps: whether or not the marked sequence
                                              # has stopped by then, the batch it joined fails

    def add(self, prompt, **kwargs):
        self.engine.calls.append(("add", len(prompt)))
        text = self.engine.tokenizer.decode(prompt)
        if FAIL_PREFILL in text:
            raise RuntimeError("injected prefill failure: secret internal detail")
        if SLOW_PREFILL in text:
            time.sleep(self.engine.faults.get("prefill_s_per_token", 0.0) * len(prompt))
        slot = self.batch.add(prompt, **kwargs)
        if FAIL_STEP in text:
            self.fail_at_step = self.steps + self.engine.faults.get("fail_after_steps", 5)
        if KILL_SCHEDULER in text:
            self.fail_at_step = self.steps + self.engine.faults.get("kill_after_steps", 5)
            self.engine.broken = True
        return slot

    def step(self):
        self.engine.calls.append(("step", self.batch.num_active))
        time.sleep(self.engine.faults.get("step_delay_s", 0.0))
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("injected decode step failure: secret internal detail")
        events = self.batch.step()
        if not self.batch.num_active:  # everything it could have failed has finished: disarm
            self.fail_at_step, self.engine.broken = None, False
        return events

    def __getattr__(self, name):
        return getattr(self.batch, name)


class FaultyEngine:
    def __init__(self, engine, faults: dict):
        self.engine, self.faults = engine, faults
        self.tokenizer = engine.tokenizer
        self.broken = False  # set by a KILL_SCHEDULER sequence: no new batch can be made
        self.calls: list[tuple[str, int]] = []  # ("add", prompt tokens) and ("step", active rows), in order

    def new_batch(self, **kwargs):
        if self.broken:
            raise RuntimeError("injected: the batch cannot be rebuilt")
        return FaultyBatch(self.engine.new_batch(**kwargs), self)


class SlowTokenizer:
    """The real tokenizer; rendering a conversation that contains SLOW_TOKENIZE sleeps first (in the calling
    thread, like a long prompt's real tokenization)."""

    def __init__(self, tokenizer, delay_s: float):
        self.tokenizer, self.delay_s = tokenizer, delay_s

    def render_for_completion(self, conversation):
        if any(SLOW_TOKENIZE in m["content"] for m in conversation["messages"]):
            time.sleep(self.delay_s)
        return self.tokenizer.render_for_completion(conversation)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


class InstrumentedChatService(ChatService.func_or_class):
    async def __init__(self, *args, faults: dict, **kwargs):
        await super().__init__(*args, **kwargs)
        scheduler = self.scheduler
        scheduler.engine = FaultyEngine(scheduler.engine, faults)
        scheduler.batch = FaultyBatch(scheduler.batch, scheduler.engine)  # the thread is idle: no request yet
        self.tokenizer = SlowTokenizer(self.tokenizer, faults.get("tokenize_delay_s", 0.0))


def instrumented_app(base_dir: Path, overrides: list[str], faults: dict, health_check_period_s: float = 10):
    """The chat application of `serve.app.build_app` with `InstrumentedChatService` as its deployment."""
    from ray import serve

    from raychat.config import load_config
    from serve.app import DEPLOYMENT, deployment_options
    cfg = load_config("demo", ["serve.source=sft", *overrides])
    options = deployment_options(cfg, replicas=1, base_dir=str(base_dir))
    path = [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    options["ray_actor_options"]["runtime_env"]["env_vars"]["PYTHONPATH"] = os.pathsep.join(path)
    options["health_check_period_s"] = health_check_period_s
    deployment = serve.deployment(name=DEPLOYMENT)(InstrumentedChatService)
    return deployment.options(**options).bind(cfg.to_dict(), "sft", "default", None, faults=faults)
