"""Continuous batching in a replica: many requests decoded together, one forward pass per token.

A background thread owns the engine's batch (`engine.new_batch`). Each loop it
1. frees the slots of sequences whose client went away or that hit a stop string (`batch.remove`),
2. admits waiting sequences into free slots (`batch.add` prefills the prompt), at most
   `prefill_tokens_per_step` prompt tokens per loop (or one longer prompt alone), so that a burst of long
   prompts delays the running streams by about one prefill per token, not by all of them at once,
3. advances every active sequence by one token (`batch.step`, one forward pass for all of them),
4. hands the new tokens to the waiting request handlers (asyncio queues, one per request).

Requests beyond the batch wait in a bounded queue; beyond that `submit` refuses at once (the service
answers 429 with Retry-After), so a burst never queues without bound. Only this thread touches the batch,
so the engine needs no locks, and every sequence has its own slot, sampling settings and generator:
nothing of one request can reach another.

Failures never leave a request waiting: a prefill that raises fails its own request; a step that raises
fails the sequences in the batch and carries on with a fresh batch; and if the thread itself dies, every
sequence it held fails at once, `submit` raises `Unavailable` (503) and `alive` turns False (so /health
fails and Serve replaces the replica). Clients get a generic message with the request id; the details
go to the log.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from raychat.common import get_logger

log = get_logger("raychat.serve")


class Unavailable(Exception):
    """The scheduler thread has stopped: this replica cannot generate any more."""


class Overloaded(Exception):
    """The batch and the wait queue are full; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the service is at capacity; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)  # compared by identity
class Sequence:
    """One sampled answer (one choice of a request) and where its tokens go."""
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    index: int                        # choice index within its request
    queue: asyncio.Queue              # receives (index, token, finished, finish_reason, error) tuples
    loop: asyncio.AbstractEventLoop
    request_id: str = ""              # names the request in the log and in error messages
    id: int = field(default_factory=itertools.count().__next__)
    slot: int | None = None
    done: bool = False                # finished, failed or cancelled: nothing more is sent


def internal_error(request_id: str) -> str:
    """What a client is told when generation fails on our side (the log has the details)."""
    return f"internal error while generating (request id {request_id}); the details are in the service's log"


class Scheduler:
    def __init__(self, engine, max_batch_size: int, max_queued: int, max_seq_len: int | None = None,
                 prefill_tokens_per_step: int = 512):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.max_seq_len = max_seq_len
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.batch = engine.new_batch(max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        self._waiting: deque[Sequence] = deque()
        self._admitting: list[Sequence] = []          # taken from the queue, being prefilled
        self._active: dict[int, Sequence] = {}      # slot -> sequence
        self._cancelled: list[Sequence] = []
        self._lock = threading.Condition()
        self._stopping = False
        self._stopped = False                       # the thread has ended: nothing is accepted any more
        # statistics (read by /stats)
        self.started = time.time()
        self.tokens_total = 0
        self.sequences_total = 0
        self.cancelled_total = 0
        self.rejected_total = 0
        self.peak_active = 0
        self.decode_s = 0.0     # time in batch.step() (one forward pass for every active sequence)
        self.decode_steps = 0
        self.prefill_s = 0.0    # time in batch.add() (one forward pass over each admitted prompt)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step over the last 10 s
        self._pauses: deque[tuple[float, float]] = deque()  # (time, seconds) running sequences waited on
                                                            # prefills between two steps, last 10 s
        self._thread = threading.Thread(target=self._run, name="raychat-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------- request side
    def submit(self, sequences: list[Sequence]) -> None:
        """Queue the sequences of one request, all or none; raise `Overloaded` when there is no room and
        `Unavailable` when the scheduler thread has stopped."""
        with self._lock:
            if self._stopped:
                raise Unavailable("the replica's scheduler has stopped; Serve replaces this replica")
            in_use = len(self._active) + len(self._admitting) + len(self._waiting)
            if in_use + len(sequences) > self.max_batch_size + self.max_queued:
                self.rejected_total += 1
                raise Overloaded(self._retry_after())
            self._waiting.extend(sequences)
            self._lock.notify()

    def cancel(self, sequences: list[Sequence]) -> None:
        """Stop generating for these sequences (client gone, or stop string reached); frees their slots
        before the next step."""
        with self._lock:
            for seq in sequences:
                if not seq.done:
                    seq.done = True
                    self._cancelled.append(seq)
            self._lock.notify()

    def stats(self) -> dict:
        with self._lock:
            now = time.time()
            window = [(t, n) for t, n in self._recent if t > now - 10.0]
            span = (now - window[0][0]) if window else 0.0
            return {
                "active_sequences": len(self._active),
                "queued_sequences": len(self._waiting),
                "max_batch_size": self.max_batch_size,
                "max_queued": self.max_queued,
                "peak_active_sequences": self.peak_active,
                "tokens_per_s": round(sum(n for _, n in window) / span, 1) if span > 0.5 else 0.0,
                "tokens_total": self.tokens_total,
                "sequences_total": self.sequences_total,
                "cancelled_total": self.cancelled_total,
                "rejected_total": self.rejected_total,
                "decode_steps_total": self.decode_steps,
                "decode_s_total": round(self.decode_s, 3),
                "prefill_s_total": round(self.prefill_s, 3),
                "decode_ms_per_step": round(1000 * self.decode_s / max(1, self.decode_steps), 2),
                "prefill_ms_per_sequence": round(1000 * self.prefill_s / max(1, self.sequences_total), 2),
                "prefill_pause_ms_max_10s": round(1000 * max((p for t, p in self._pauses if t > now - 10.0),
                                                             default=0.0), 1),
                "busy_fraction": round((self.decode_s + self.prefill_s) / max(1e-9, now - self.started), 3),
                "uptime_s": round(now - self.started, 1),
            }

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=10)

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: queued work over the recent decode speed (1..60)."""
        now = time.time()
        span = min(10.0, now - self.started)
        rate = sum(n for t, n in self._recent if t > now - 10.0) / max(span, 1.0)
        if rate <= 0:
            return 1
        queued_tokens = sum(s.max_tokens for s in self._waiting)
        return max(1, min(60, math.ceil(queued_tokens / rate)))

    # ---------------------------------------------------------------------------- scheduler thread
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # the thread ends here either way; the log has why
            log.exception("the scheduler thread died; failing every request it held")
        finally:
            self._fail_everything()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._active or self._cancelled):
                    self._lock.wait()
                if self._stopping:
                    return
                cancelled, self._cancelled = self._cancelled, []
                self._admitting = self._take_admissions()
            try:
                self._free(cancelled)
                self._admit()
                if self._active:
                    self._step()
            except Exception:  # a failed step: fail what was in the batch, go on with a fresh batch
                requests = sorted({seq.request_id for seq in self._active.values()})
                log.exception(f"decode step failed; failing requests {', '.join(requests)}")
                with self._lock:  # sequences not prefilled yet had no part in it: they wait for the next loop
                    self._waiting.extendleft(reversed(self._admitting))
                    self._admitting = []
                self._fail_active()

    def _take_admissions(self) -> list[Sequence]:
        """Waiting sequences for the free slots, within the prefill budget (call with the lock held)."""
        admit: list[Sequence] = []
        budget = self.prefill_tokens_per_step
        while self._waiting and len(self._active) + len(admit) < self.max_batch_size:
            cost = len(self._waiting[0].prompt)
            if admit and cost > budget:  # a longer prompt waits for the next loop, where it goes first
                break
            admit.append(self._waiting.popleft())
            budget -= cost
        return admit

    def _free(self, cancelled: list[Sequence]) -> None:
        for seq in cancelled:
            with self._lock:
                if seq in self._waiting:
                    self._waiting.remove(seq)
                    self.cancelled_total += 1
            # the identity check: a finished sequence's slot may already belong to another one
            if seq.slot is not None and self._active.get(seq.slot) is seq:
                self.batch.remove(seq.slot)
                with self._lock:
                    del self._active[seq.slot]
                    self.cancelled_total += 1

    def _admit(self) -> None:
        """Prefill the sequences in `_admitting`; each leaves that list once it is in the batch or failed."""
        started, running = time.perf_counter(), bool(self._active)
        while self._admitting:
            seq = self._admitting[0]
            cancelled = seq.done  # its client went away on its way into the batch
            if not cancelled:
                self._prefill(seq)
            with self._lock:
                self._admitting.pop(0)
                self.cancelled_total += cancelled
        if running:  # how long the running sequences waited for their next token because of prefills
            now = time.time()
            with self._lock:
                self._pauses.append((now, time.perf_counter() - started))
                while self._pauses and self._pauses[0][0] < now - 10.0:
                    self._pauses.popleft()

    def _prefill(self, seq: Sequence) -> None:
        started = time.perf_counter()
        try:
            seq.slot = self.batch.add(seq.prompt, max_tokens=seq.max_tokens, temperature=seq.temperature,
                                      top_k=seq.top_k, top_p=seq.top_p, seed=seq.seed)
        except Exception:  # this request fails; a failed add leaves the batch's other rows as they were
            log.exception(f"prefill failed for request {seq.request_id}")
            self._send(seq, None, True, None, internal_error(seq.request_id))
            return
        finally:
            self.prefill_s += time.perf_counter() - started
        with self._lock:
            self._active[seq.slot] = seq
            self.sequences_total += 1
            self.peak_active = max(self.peak_active, len(self._active))

    def _step(self) -> None:
        started = time.perf_counter()
        events = self.batch.step()
        self.decode_s += time.perf_counter() - started
        self.decode_steps += 1
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        produced = 0
        for event in events:
            seq = self._active.get(event.slot)
            if seq is None:
                continue
            if event.token is not None:
                produced += 1
            if event.finished:
                with self._lock:
                    del self._active[event.slot]
            if seq.done:
                continue
            if event.finished:
                seq.done = True
            deliveries.setdefault(seq.loop, []).append(
                (seq.queue, (seq.index, event.token, event.finished, event.finish_reason, None)))
        with self._lock:
            self.tokens_total += produced
            now = time.time()
            self._recent.append((now, produced))
            while self._recent and self._recent[0][0] < now - 10.0:
                self._recent.popleft()
        # one wake-up per event loop per step, not one per token
        for loop, items in deliveries.items():
            _call_soon(loop, _deliver, items)

    def _send(self, seq: Sequence, token, finished, reason, error) -> None:
        seq.done = True
        _call_soon(seq.loop, _deliver, [(seq.queue, (seq.index, token, finished, reason, error))])

    def _fail_active(self) -> None:
        with self._lock:
            active = list(self._active.values())
            self._active.clear()
        for seq in active:
            if not seq.done:
                self._send(seq, None, True, None, internal_error(seq.request_id))
        # start from a clean batch: the failed one may be half-updated
        self.batch = self.engine.new_batch(max_batch_size=self.max_batch_size, max_seq_len=self.max_seq_len)

    def _fail_everything(self) -> None:
        """The thread is ending (shutdown or death): refuse new work and fail every sequence still held."""
        with self._lock:
            self._stopped = True
            held = [*self._waiting, *self._admitting, *self._active.values()]
            self._waiting.clear()
            self._admitting = []
            self._active.clear()
        for seq in held:
            if not seq.done:
                self._send(seq, None, True, None, internal_error(seq.request_id))


def _deliver(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the request's event loop is closed: nobody is listening any more
        pass
