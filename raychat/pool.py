"""A pool of Ray actors that each hold one copy of a model: base evaluation, chat evaluation and RL
rollouts all hand their work out through it.

The model and the tokenizer go into the object store once (`ray.put`) and every actor fetches them from
there, so starting N actors costs one serialisation, not N. Work is a list of chunks; `map` gives each
free actor the next chunk and returns the results in chunk order, so the answer does not depend on how
many actors there are or which one was fast. An actor that dies (its process killed, its node lost) is
replaced by a fresh one from the same object-store copy and its chunk is handed out again, so a chunk is
never lost and never counted twice; after `max_restarts` replacements the pool gives up with a clear
error instead of looping.

One GPU per actor when `use_gpu` (a cluster), one CPU otherwise. The actor classes are plain Python
classes deriving from `ModelWorker`; the pool makes them Ray actors.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Sequence

import ray
import torch

from raychat.common import UserError, get_logger

log = get_logger()


class ModelWorker:
    """The part of every pool actor that holds the model: on the GPU when asked for and present, in fp32
    on a CPU (bf16 checkpoints: fp32 matmuls are faster on CPUs without bf16 units), in eval mode."""

    def __init__(self, model, tokenizer, use_gpu: bool):
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = model.to(self.device)
        if self.device == "cpu":
            self.model.float()
        self.model.eval()
        self.tokenizer = tokenizer

    def ping(self) -> str:
        return self.device


def chunked(items: Sequence, size: int) -> list[list]:
    """`items` cut into consecutive chunks of `size` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [list(items[start:start + size]) for start in range(0, len(items), size)]


def balanced_chunk_size(total: int, num_actors: int, chunks_per_actor: int = 4) -> int:
    """A chunk size that gives every actor several chunks, so a fast actor takes more of the work."""
    return max(1, math.ceil(total / (chunks_per_actor * num_actors)))


class ModelPool:
    """`num_actors` Ray actors of class `worker_cls` (a `ModelWorker`), each built as
    `worker_cls(model, tokenizer, use_gpu, *args)`, with `num_gpus` each when `use_gpu` (a fraction shares a
    GPU). Use as a context manager, or call `shutdown()`."""

    def __init__(self, worker_cls: type, model, tokenizer, num_actors: int, use_gpu: bool, *args,
                 max_restarts: int = 3, num_cpus: float = 1, num_gpus: float = 1):
        if num_actors < 1:
            raise UserError(f"a model pool needs at least one actor, got {num_actors}")
        if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
            raise UserError("use_gpu is true but the Ray cluster has no GPU: run on a GPU cluster or pass "
                            "--set <section>.use_gpu=false")
        options = {"num_cpus": num_cpus, **({"num_gpus": num_gpus} if use_gpu else {})}
        self._remote_cls = ray.remote(worker_cls).options(**options)
        # one copy in the object store; every actor (and every replacement) is built from it
        self._init_args = (ray.put(model.cpu()), ray.put(tokenizer),
                           use_gpu, *args)
        self.max_restarts = max_restarts
        self.restarts = 0
        self.on_replace = None   # called with a replacement actor before it gets work (RL: the latest weights)
        self.actors = [self._start() for _ in range(num_actors)]

    def _start(self):
        return self._remote_cls.remote(*self._init_args)

    def __enter__(self) -> "ModelPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __len__(self) -> int:
        return len(self.actors)

    def _replace(self, index: int, error: Exception) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RuntimeError(f"pool actors died {self.restarts} times (limit {self.max_restarts}); "
                               f"last: {type(error).__name__}: {error}") from error
        log.warning(f"pool actor {index} died ({type(error).__name__}); starting a replacement "
                    f"({self.restarts}/{self.max_restarts}) and handing its work out again")
        try:
            ray.kill(self.actors[index])
        except Exception:  # already gone
            pass
        self.actors[index] = self._start()
        if self.on_replace is not None:
            self.on_replace(self.actors[index])

    def map(self, method: str, chunks: Sequence, *args) -> list:
        """`actor.<method>(chunk, *args)` for every chunk, on whichever actor is free; the results in chunk
        order. A chunk whose actor dies runs again on the replacement."""
        results: list[Any] = [None] * len(chunks)
        waiting = deque(range(len(chunks)))
        idle = deque(range(len(self.actors)))
        running: dict = {}  # object ref -> (chunk index, actor index)
        while waiting or running:
            while waiting and idle:
                chunk, actor = waiting.popleft(), idle.popleft()
                ref = getattr(self.actors[actor], method).remote(chunks[chunk], *args)
                running[ref] = (chunk, actor)
            [ref], _ = ray.wait(list(running), num_returns=1)
            chunk, actor = running.pop(ref)
            try:
                results[chunk] = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                self._replace(actor, error)
                waiting.appendleft(chunk)
            idle.append(actor)
        return results

    def call_all(self, method: str, *args) -> list:
        """`actor.<method>(*args)` on every actor at once (e.g. new weights); an actor that died is replaced
        and the call made again on the replacement. Results in actor order."""
        results: list[Any] = [None] * len(self.actors)
        pending = list(range(len(self.actors)))
        while pending:
            refs = {getattr(self.actors[i], method).remote(*args): i for i in pending}
            pending = []
            for ref, i in refs.items():
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    self._replace(i, error)
                    pending.append(i)
        return results

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors = []
