"""Generation with a KV cache: streaming, batched, continuously batched, with the calculator tool.

Everything runs on one machinery, the `Batch`: a set of slots (sequences) that share one `KVCache`, one
row each. Adding a slot prefills its prompt once; `Batch.step()` then advances every active slot by one
token in a single forward pass, whatever each slot's length. Slots can join and leave between steps
(continuous batching for serving). `Engine.generate` / `generate_batch` / `generate_many` are thin loops
over a Batch.

Per slot:
  * sampling: temperature 0 = greedy, top-k, top-p; a slot's own seeded `torch.Generator` (CPU) draws its
    random numbers, so a seed reproduces the output whatever else shares the batch;
  * the calculator tool: text between <|python_start|> and <|python_end|> is evaluated by
    `raychat.calculator`; its result is forced in as <|output_start|> result <|output_end|> (mask 0);
  * it stops at <|assistant_end|> or <|bos|> ("stop"), at max_tokens or when the sequence fills
    `max_seq_len` ("length").
"""
from __future__ import annotations

import hashlib
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from raychat.calculator import calculate
from raychat.model import GPT, KVCache, autocast_context

MAX_TOOL_EXPRESSION_TOKENS = 256  # a python block longer than this is not sent to the calculator


@dataclass
class TokenEvent:
    """What one `Batch.step()` did to one slot.

    token: the token appended to the slot; None on a "stop" (the terminal token is never reported as
        text; `stop_token` says which one it was).
    forced: True when the token was forced by the calculator tool rather than sampled.
    finished: True on the slot's last event; the slot is then already freed.
    finish_reason: "stop" (assistant_end or bos sampled) or "length" (max_tokens or max_seq_len reached).
    """
    slot: int
    token: int | None
    forced: bool
    finished: bool
    finish_reason: str | None
    stop_token: int | None = None


class ToolUse:
    """The calculator state machine of one sequence. `observe(token)` returns the tokens to force next."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.python_start = tokenizer.encode_special("<|python_start|>")
        self.python_end = tokenizer.encode_special("<|python_end|>")
        self.output_start = tokenizer.encode_special("<|output_start|>")
        self.output_end = tokenizer.encode_special("<|output_end|>")
        self.expression: list[int] | None = None  # tokens since <|python_start|>; None = outside a block

    def observe(self, token: int) -> list[int]:
        if token == self.python_start:
            self.expression = []
        elif token == self.python_end and self.expression is not None:
            expression, self.expression = self.expression, None
            if expression and len(expression) <= MAX_TOOL_EXPRESSION_TOKENS:
                result = calculate(self.tokenizer.decode(expression))
                if result is not None:
                    return [self.output_start, *self.tokenizer.encode(result), self.output_end]
        elif self.expression is not None:
            self.expression.append(token)
        return []


def derive_seed(seed: int, index: int) -> int:
    """Independent per-row seeds from one request seed (row i of a request with seed s)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_tokens(logits: torch.Tensor, temperatures: list[float], top_ks: list[int | None],
                  top_ps: list[float | None], uniforms: list[float]) -> list[int]:
    """One token per row of logits (B, V). Rows with temperature <= 0 take the argmax; the others sample
    by inverse CDF with their own uniform number in [0, 1), after top-k and top-p filtering (top-p keeps
    the smallest set of most likely tokens whose probability reaches p)."""
    B, V = logits.shape
    tokens = logits.argmax(dim=-1)
    rows = [i for i in range(B) if temperatures[i] > 0]
    if rows:
        device = logits.device
        index = torch.tensor(rows, device=device)
        temps = torch.tensor([temperatures[i] for i in rows], device=device, dtype=torch.float32)
        ks = [min(top_ks[i] or V, V) for i in rows]
        ps = [top_ps[i] for i in rows]
        scaled = logits[index].float() / temps[:, None]
        if any(p is not None for p in ps):
            values, order = scaled.sort(dim=-1, descending=True)
        elif max(ks) < V:
            values, order = scaled.topk(max(ks), dim=-1)
        else:
            values, order = scaled, None
        probs = F.softmax(values, dim=-1)
        rank = torch.arange(values.size(1), device=device)
        keep = rank[None, :] < torch.tensor(ks, device=device)[:, None]
        if any(p is not None for p in ps):
            p = torch.tensor([float("inf") if p is None else p for p in ps], device=device)
            keep &= (probs.cumsum(dim=-1) - probs) < p[:, None]
        cdf = (probs * keep).cumsum(dim=-1)
        u = torch.tensor([uniforms[i] for i in rows], device=device, dtype=cdf.dtype)
        choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=values.size(1) - 1)
        chosen = choice[:, 0] if order is None else order.gather(1, choice)[:, 0]
        tokens[index] = chosen
    return tokens.tolist()


@dataclass
class _Slot:
    id: int
    row: int
    max_tokens: int | None
    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator
    tool: ToolUse | None
    forced: deque = field(default_factory=deque)
    generated: int = 0
    next_input: int | None = None


class Batch:
    """A continuously batched set of sequences sharing one KV cache (see the module docstring).

        batch = engine.new_batch(max_batch_size=32, max_seq_len=2048)
        slot = batch.add(prompt_ids, max_tokens=256, temperature=0.8, top_p=0.95, seed=1)
        while batch.num_active:
            for event in batch.step():   # one forward pass for all active slots
                ...                      # event.slot, event.token, event.finished, event.finish_reason
        batch.remove(slot)               # e.g. the client went away; frees the slot at once

    Slot ids are never reused within a batch. Not thread-safe: drive it from one thread.
    Active slots occupy cache rows [0, num_active); freeing a row moves the last row into it, so a
    step always works on one contiguous block of the cache (no gather of keys/values per step).
    """

    def __init__(self, engine: "Engine", max_batch_size: int = 32, max_seq_len: int | None = None):
        model = engine.model
        limit = model.cos.size(0)
        max_seq_len = model.config.sequence_len if max_seq_len is None else max_seq_len
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 2 <= max_seq_len <= limit:
            raise ValueError(f"max_seq_len must be in [2, {limit}], got {max_seq_len}")
        self.engine, self.model = engine, model
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.device = model.lm_head.weight.device
        # start small and grow (doubling) as slots and lengths need it
        self.cache: KVCache = model.new_kv_cache(min(max_batch_size, 4), min(max_seq_len, 256))
        self._logits = torch.zeros(self.cache.batch_size, model.config.vocab_size, device=self.device)
        self._rows: list[_Slot] = []      # row i of the cache belongs to self._rows[i]
        self._slots: dict[int, _Slot] = {}
        self._next_id = 0

    # -- public API ---------------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self._rows)

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - len(self._rows)

    def add(self, prompt_tokens: list[int], max_tokens: int | None = None, temperature: float = 1.0,
            top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> int:
        """Prefill the prompt and return the new slot's id. Its first token comes with the next step().
        Raises ValueError when the batch is full, the prompt is empty or too long (a prompt must leave
        room for at least one new token within max_seq_len), or a sampling setting is out of range."""
        return self._add(prompt_tokens, 1, max_tokens, temperature, top_k, top_p,
                         [secrets.randbits(63) if seed is None else seed])[0]

    def remove(self, slot: int) -> bool:
        """Free a slot now (its events stop). False when it is unknown or already finished."""
        state = self._slots.get(slot)
        if state is None:
            return False
        self._free([state.row])
        return True

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Advance every active slot by one token: pick each slot's token from its pending logits (or its
        forced tool output), report it, free finished slots, then run ONE forward pass over the rest."""
        if not self._rows:
            return []
        engine = self.engine
        samplers = [s for s in self._rows if not s.forced]
        sampled = {}
        if samplers:
            rows = [s.row for s in samplers]
            # a slot's generator is only advanced when it samples: its output depends on its seed alone
            uniforms = [torch.rand((), generator=s.generator).item() if s.temperature > 0 else 0.0
                        for s in samplers]
            # every row samples (no tool output forced): a view of the logits, not a (rows, vocab) gather
            logits = self._logits[:len(rows)] if len(rows) == len(self._rows) else self._logits[rows]
            tokens = sample_tokens(logits, [s.temperature for s in samplers],
                                   [s.top_k for s in samplers], [s.top_p for s in samplers], uniforms)
            sampled = {s.id: t for s, t in zip(samplers, tokens)}
        events, finished_rows = [], []
        for s in self._rows:
            forced = bool(s.forced)
            token = s.forced.popleft() if forced else sampled[s.id]
            s.generated += 1
            if token in engine.stop_tokens:
                events.append(TokenEvent(s.id, None, forced, True, "stop", stop_token=token))
                finished_rows.append(s.row)
                continue
            if s.tool is not None:
                s.forced.extend(s.tool.observe(token))
            # the sequence now holds cache length + 1 tokens; the next token would need one more position
            full = self.cache.lengths[s.row] + 1 >= self.max_seq_len
            done = full or (s.max_tokens is not None and s.generated >= s.max_tokens)
            events.append(TokenEvent(s.id, token, forced, done, "length" if done else None))
            if done:
                finished_rows.append(s.row)
            else:
                s.next_input = token
        self._free(finished_rows)
        if self._rows:
            n = len(self._rows)
            self._ensure_capacity(n, max(self.cache.lengths[:n]) + 1)
            inputs = torch.tensor([[s.next_input] for s in self._rows], device=self.device)
            self._logits[:n] = self._forward(inputs, 0, n)
        return events

    # -- internals ------------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        with autocast_context(self.device):
            logits = self.model(ids, kv_cache=self.cache.select(start, stop), last_only=True)
        return logits[:, -1].float()

    def _add(self, prompt_tokens, copies, max_tokens, temperature, top_k, top_p, seeds) -> list[int]:
        vocab = self.model.config.vocab_size
        prompt = list(prompt_tokens)
        if not prompt:
            raise ValueError("empty prompt")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt tokens must be ints in [0, {vocab})")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room within max_seq_len {self.max_seq_len}")
        if copies > self.free_slots:
            raise ValueError(f"batch full: {self.free_slots} free slots, {copies} needed")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        first = len(self._rows)
        self._ensure_capacity(first + copies, len(prompt))
        self.cache.reset(first)
        ids = torch.tensor([prompt], device=self.device)
        with torch.inference_mode():
            self._logits[first] = self._forward(ids, first, first + 1)[0]
            for row in range(first + 1, first + copies):  # the prompt is prefilled once, then copied
                self.cache.copy_row(first, row)
                self._logits[row] = self._logits[first]
        slot_ids = []
        for i in range(copies):
            generator = torch.Generator()
            generator.manual_seed(int(seeds[i]) % 2**63)  # any int works, negative or huge
            tool = ToolUse(self.engine.tokenizer) if self.engine.tokenizer is not None else None
            slot = _Slot(self._next_id, first + i, max_tokens, temperature, top_k, top_p, generator, tool)
            self._next_id += 1
            self._rows.append(slot)
            self._slots[slot.id] = slot
            slot_ids.append(slot.id)
        return slot_ids

    def _free(self, rows: list[int]) -> None:
        """Free rows; the last active row moves into each hole so active rows stay contiguous."""
        for row in sorted(rows, reverse=True):
            slot = self._rows[row]
            del self._slots[slot.id]
            last = len(self._rows) - 1
            if row != last:
                moved = self._rows[last]
                self.cache.copy_row(last, row)
                self._logits[row] = self._logits[last]
                moved.row = row
                self._rows[row] = moved
            self._rows.pop()

    def _ensure_capacity(self, rows: int, length: int) -> None:
        cache = self.cache
        if rows <= cache.batch_size and length <= cache.max_seq_len:
            return
        new_rows = cache.batch_size
        while new_rows < rows:
            new_rows = min(2 * new_rows, self.max_batch_size)
        new_len = cache.max_seq_len
        while new_len < length:
            new_len = min(2 * new_len, self.max_seq_len)
        self.cache = cache.resized(new_rows, new_len)
        if new_rows > self._logits.size(0):
            logits = torch.zeros(new_rows, self._logits.size(1), device=self.device)
            logits[:self._logits.size(0)] = self._logits
            self._logits = logits


class Engine:
    """Generation for one model. `tokenizer` supplies the stop tokens (<|assistant_end|>, <|bos|>) and the
    calculator tool; with tokenizer=None the engine works on raw ids: no stop token and no tool."""

    def __init__(self, model: GPT, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_tokens: set[int] = set()
        if tokenizer is not None:
            self.stop_tokens = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    def new_batch(self, max_batch_size: int = 32, max_seq_len: int | None = None) -> Batch:
        """A continuously batched set of slots (see `Batch`). max_seq_len defaults to the model's context."""
        return Batch(self, max_batch_size, max_seq_len)

    def _seq_len_for(self, prompt_len: int, max_tokens: int | None) -> int:
        limit = self.model.cos.size(0)
        if max_tokens is None:
            return max(self.model.config.sequence_len, min(prompt_len + 1, limit))
        return min(prompt_len + max_tokens, limit)

    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                 top_p: float | None = None) -> Iterator[tuple[list[int], list[int]]]:
        """Stream `num_samples` continuations of one prompt (prefilled once). Yields per step a token column
        and a mask column, one entry per sample (mask 1 = sampled, 0 = forced by the tool). A sample's
        terminal token appears in its column once; afterwards that row repeats it with mask 0 until all
        rows are done."""
        batch = self.new_batch(num_samples, self._seq_len_for(len(tokens), max_tokens))
        slots = batch._add(tokens, num_samples, max_tokens, temperature, top_k, top_p,
                           [derive_seed(seed, i) for i in range(num_samples)])
        row_of = {slot: i for i, slot in enumerate(slots)}
        ended: dict[int, int] = {}  # row -> its terminal token, repeated once the row has stopped
        while batch.num_active:
            column = [ended.get(i, 0) for i in range(num_samples)]
            masks = [0] * num_samples
            for event in batch.step():
                i = row_of[event.slot]
                if event.token is None:
                    column[i], masks[i] = event.stop_token, 1
                    ended[i] = event.stop_token
                else:
                    column[i], masks[i] = event.token, 0 if event.forced else 1
            yield column, masks

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Finished sequences (prompt included, terminal token excluded) and masks (0 = prompt or forced)."""
        return self.generate_many([tokens], num_samples=num_samples, **kwargs)

    def generate_many(self, prompts: list[list[int]], num_samples: int = 1, max_tokens: int | None = None,
                      temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                      top_p: float | None = None, max_batch_size: int = 32,
                      seeds: list[int] | None = None, include_stop: bool = False) -> tuple[list[list[int]], list[list[int]]]:
        """Continuations of many prompts of different lengths, decoded together (continuous batching: a
        prompt joins as soon as `num_samples` slots are free). Returns len(prompts) * num_samples
        sequences, prompt-major (sample j of prompt i at i * num_samples + j), each the prompt plus its
        generated tokens (terminal excluded), with masks (0 = prompt or forced, 1 = sampled). Sample j of
        prompt i uses seed derive_seed(seeds[i], j) (seeds defaults to `seed` for every prompt), whatever
        else runs beside it. With include_stop, a sequence that stopped ends with its terminal token
        (mask 1: RL trains the model to stop)."""
        if num_samples > max_batch_size:
            raise ValueError(f"num_samples ({num_samples}) exceeds max_batch_size ({max_batch_size})")
        if seeds is None:
            seeds = [seed] * len(prompts)
        elif len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        longest = max((len(p) for p in prompts), default=1)
        batch = self.new_batch(max_batch_size, self._seq_len_for(longest, max_tokens))
        results = [list(p) for p in prompts for _ in range(num_samples)]
        masks = [[0] * len(p) for p in prompts for _ in range(num_samples)]
        where: dict[int, int] = {}
        pending = deque(range(len(prompts)))
        while pending or batch.num_active:
            while pending and batch.free_slots >= num_samples:
                i = pending.popleft()
                slots = batch._add(prompts[i], num_samples, max_tokens, temperature, top_k, top_p,
                                   [derive_seed(seeds[i], j) for j in range(num_samples)])
                where.update({slot: i * num_samples + j for j, slot in enumerate(slots)})
            for event in batch.step():
                if event.token is not None:
                    results[where[event.slot]].append(event.token)
                    masks[where[event.slot]].append(0 if event.forced else 1)
                elif include_stop and event.stop_token is not None:
                    results[where[event.slot]].append(event.stop_token)
                    masks[where[event.slot]].append(1)
        return results, masks
