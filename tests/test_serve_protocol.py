"""The chat service's parts that need no Ray: request validation, UTF-8-safe streaming text, the Host
rule, and the continuous-batching scheduler driving a real (tiny) engine, with injected failures."""
import asyncio
import json
import logging
import time

import pytest
import torch

from raychat.engine import Engine
from raychat.streaming import TextStream
from serve.app import _decode
from serve.guard import LOOPBACK_NAMES, allowed_host_names
from serve.protocol import APIError, Limits, parse_chat_request
from serve.scheduler import Overloaded, Scheduler, Sequence, Unavailable
from serve_helpers import FAIL_PREFILL, FAIL_STEP, KILL_SCHEDULER, FaultyEngine, tiny_model

LIMITS = Limits(max_messages=8, max_chars_per_message=100, max_total_chars=250, default_max_tokens=32,
                max_batch_size=4, max_tokens_per_request=100)
USER = {"role": "user", "content": "hi"}


def parse(body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_chat_request(raw, LIMITS)


def status_of(body) -> tuple[int, str]:
    with pytest.raises(APIError) as info:
        parse(body)
    error = info.value
    assert error.body()["error"]["message"] == error.message
    return error.status, error.message


# ------------------------------------------------------------------------------------------ validation

def test_without_max_tokens_the_default_is_lowered_to_fit_the_per_request_budget():
    _, params = parse({"messages": [USER], "n": 4})
    assert params.max_tokens == 25 and params.n == 4  # 100 // 4, under the default of 32
    _, params = parse({"messages": [USER], "n": 4, "max_tokens": 25})
    assert params.max_tokens == 25


def test_allowed_hosts_default_to_loopback_names_on_a_loopback_bind():
    assert allowed_host_names("", "127.0.0.1") == LOOPBACK_NAMES == allowed_host_names("", "::1")
    assert allowed_host_names("", "0.0.0.0") is None and allowed_host_names("*", "127.0.0.1") is None
    assert allowed_host_names(" chat.example.com, LOCALHOST ", "0.0.0.0") == {"chat.example.com", "localhost"}


def test_valid_request_resolves_defaults_and_options():
    request, params = parse({"messages": [{"role": "system", "content": "be brief"}, USER,
                                          {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
                                          {"role": "user", "content": "again"}],
                             "model": "x", "user": "ignored-field", "temperature": 0, "top_k": 0, "top_p": 1,
                             "stop": "\n\n", "n": 2, "seed": 7, "stream": True})
    assert request.stream and len(request.messages) == 4 and request.messages[2].text == "hello"
    assert (params.temperature, params.top_k, params.top_p, params.seed, params.n) == (0.0, None, None, 7, 2)
    assert params.stop == ("\n\n",) and params.max_tokens == LIMITS.default_max_tokens
    _, params = parse({"messages": [USER], "max_completion_tokens": 5, "top_k": 40, "top_p": 0.9})
    assert (params.max_tokens, params.top_k, params.top_p, params.temperature) == (5, 40, 0.9, 1.0)


@pytest.mark.parametrize("body, status, needle", [
    (b"\xff\xfe{}", 400, "UTF-8"),
    (b"{not json", 400, "not valid JSON"),
    (b'{"messages": [], "temperature": NaN}', 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, 413, "bytes"),
    ({}, 422, "messages"),
    ({"messages": []}, 422, "messages"),
    ({"messages": "hi"}, 422, "messages"),
    ({"messages": [{"role": "user"}]}, 422, "messages[0].content"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 422, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 422, "messages[0]"),
    ({"messages": [USER], "temperature": 2.5}, 422, "temperature"),
    ({"messages": [USER], "temperature": -0.1}, 422, "temperature"),
    ({"messages": [USER], "temperature": "0.5"}, 422, "temperature"),
    ({"messages": [USER], "top_k": 201}, 422, "top_k"),
    ({"messages": [USER], "top_k": 1.5}, 422, "top_k"),
    ({"messages": [USER], "top_p": 0}, 422, "top_p"),
    ({"messages": [USER], "max_tokens": 0}, 422, "max_tokens"),
    ({"messages": [USER], "max_tokens": 4097}, 422, "max_tokens"),
    ({"messages": [USER], "n": 9}, 422, "n"),
    ({"messages": [USER], "seed": -1}, 422, "seed"),
    ({"messages": [USER], "stream": "yes"}, 422, "stream"),
    ({"messages": [USER], "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"messages": [USER], "stop": [""]}, 422, "stop"),
    ({"messages": [USER] * 9}, 413, "9 messages"),
    ({"messages": [{"role": "user", "content": "x" * 101}]}, 413, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 90}, {"role": "assistant", "content": "x" * 90},
                   {"role": "user", "content": "x" * 90}]}, 413, "270 characters"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "expected 'user'"),
    ({"messages": [USER, USER]}, 400, "messages[1].role"),
    ({"messages": [USER, {"role": "system", "content": "x"}, USER]}, 400, "system"),
    ({"messages": [USER, {"role": "assistant", "content": "x"}]}, 400, "last message"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, 400, "surrogate"),
    ({"messages": [USER], "presence_penalty": 1.0}, 400, "presence_penalty"),
    ({"messages": [USER], "logprobs": True}, 400, "logprobs"),
    ({"messages": [USER], "n": 5}, 400, "at most 4 sequences"),            # more choices than the batch holds
    ({"messages": [USER], "n": 4, "max_tokens": 26}, 400, "4 x 26 = 104"),  # over max_tokens_per_request
    ({"messages": [USER], "max_completion_tokens": 101}, 400, "limit per request is 100"),
])
def test_bad_requests_get_the_documented_status_and_name_the_problem(body, status, needle):
    got_status, message = status_of(body)
    assert got_status == status, message
    assert needle in message


# ------------------------------------------------------------------------------------------- streaming

def stream_all(tokenizer, ids, stop=()):
    stream = TextStream(tokenizer, stop)
    return [stream.push(i) for i in ids] + [stream.finish()], stream


def test_multibyte_characters_split_across_tokens_are_emitted_whole(tokenizer):
    text = "naïve café: 😀🤖 世界 — ünïcödé ✓"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the vocab really splits these characters
    pieces, stream = stream_all(tokenizer, ids)
    assert "".join(pieces) == text == stream.text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stop_strings_end_the_text_even_when_split_across_tokens(tokenizer):
    text = "first line\n\nsecond line"
    pieces, stream = stream_all(tokenizer, tokenizer.encode(text), stop=["\n\n"])
    assert "".join(pieces) == "first line" and stream.stopped
    pieces, stream = stream_all(tokenizer, tokenizer.encode("a b c"), stop=["b c d"])  # a prefix that never completes
    assert "".join(pieces) == "a b c" and not stream.stopped


def test_calculator_tokens_are_shown_in_gsm8k_notation(tokenizer):
    sp = tokenizer.encode_special
    ids = ([sp("<|python_start|>")] + tokenizer.encode("48/2") + [sp("<|python_end|>"), sp("<|output_start|>")]
           + tokenizer.encode("24") + [sp("<|output_end|>")] + tokenizer.encode(" so 24"))
    pieces, _ = stream_all(tokenizer, ids)
    assert "".join(pieces) == "<<48/2=24>> so 24"


# ------------------------------------------------------------------------------------------- scheduler

@pytest.fixture(scope="module")
def engine(tokenizer):
    torch.manual_seed(0)
    return Engine(tiny_model(tokenizer), tokenizer)


@pytest.fixture
def scheduler(engine):
    scheduler = Scheduler(engine, max_batch_size=4, max_queued=4)
    yield scheduler
    scheduler.shutdown()


@pytest.fixture
def faulty(engine):
    """A scheduler on the real engine wrapped with the injected faults of serve_helpers (slow steps, so that
    requests overlap)."""
    faulty_engine = FaultyEngine(engine, {"step_delay_s": 0.005, "fail_after_steps": 5, "kill_after_steps": 5})
    scheduler = Scheduler(faulty_engine, max_batch_size=2, max_queued=4, prefill_tokens_per_step=64)
    yield scheduler
    scheduler.shutdown()


@pytest.fixture
def serve_log():
    """The lines the service logs (its logger does not propagate to pytest's caplog)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(logging.Formatter().format(record))
    logger = logging.getLogger("raychat.serve")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def submit(scheduler, tokenizer, text, max_tokens=24, temperature=0.0, seed=1, n=1, request_id="req"):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": text}]})
    sequences = [Sequence(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_k=None, top_p=None,
                          seed=seed + i, index=i, queue=queue, loop=loop, request_id=request_id)
                 for i in range(n)]
    scheduler.submit(sequences)
    return sequences, queue


async def collect(scheduler, tokenizer, text, stop=(), expect_error=False, **kwargs):
    """(texts, finish reasons) of one request; with expect_error, its error message instead."""
    from serve.protocol import SamplingParams
    sequences, queue = submit(scheduler, tokenizer, text, **kwargs)
    params = SamplingParams(max_tokens=0, temperature=0, top_k=None, top_p=None, seed=None, stop=tuple(stop),
                            n=len(sequences))
    texts, reasons = [""] * len(sequences), [None] * len(sequences)
    async for deltas, finished, error, _ in _decode(tokenizer, sequences, queue, params, scheduler):
        if expect_error:
            if error:
                return error
            continue
        assert error is None
        for i, t in deltas.items():
            texts[i] += t
        reasons = [finished.get(i, r) for i, r in enumerate(reasons)]
    assert not expect_error, "the request was expected to fail"
    return texts, reasons


def test_concurrent_requests_share_the_batch_and_do_not_leak_into_each_other(scheduler, tokenizer):
    prompts = [f"question number {i}" for i in range(8)]

    async def run():
        alone = [await collect(scheduler, tokenizer, p, temperature=0.8, seed=3) for p in prompts[:2]]
        together = await asyncio.gather(*[collect(scheduler, tokenizer, p, temperature=0.8, seed=3) for p in prompts])
        return alone, together

    alone, together = asyncio.run(run())
    assert scheduler.stats()["peak_active_sequences"] == 4  # 8 requests, 4 slots: decoded 4 at a time
    assert [t for t, _ in together[:2]] == [t for t, _ in alone]  # same seed, same answer, whatever runs beside it
    assert len({t[0] for t, _ in together}) == len(prompts)  # different prompts, different answers
    assert all(r == ["length"] or r == ["stop"] for _, r in together)
    stats = scheduler.stats()
    assert stats["active_sequences"] == stats["queued_sequences"] == 0 and stats["sequences_total"] == 10


def test_n_choices_and_stop_strings(scheduler, tokenizer):
    texts, reasons = asyncio.run(collect(scheduler, tokenizer, "hello", n=3, temperature=1.0, seed=5))
    assert len(set(texts)) == 3 and all(r in ("length", "stop") for r in reasons)
    # a stop string taken from the greedy answer itself cuts the answer there
    (greedy,), _ = asyncio.run(collect(scheduler, tokenizer, "hello"))
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    (cut,), (reason,) = asyncio.run(collect(scheduler, tokenizer, "hello", stop=[stop]))
    assert reason == "stop" and cut == greedy[:greedy.index(stop)]


def test_overload_is_refused_and_disconnects_free_slots(scheduler, tokenizer):
    async def run():
        held = []
        with pytest.raises(Overloaded) as info:  # 4 slots + 4 queued, then refused
            for i in range(40):
                held.append(submit(scheduler, tokenizer, f"long {i}", max_tokens=200, temperature=1.0, seed=i))
        assert len(held) >= 8 and info.value.retry_after >= 1
        await asyncio.sleep(0.2)
        assert scheduler.stats()["peak_active_sequences"] == 4
        started = asyncio.get_running_loop().time()
        scheduler.cancel([s for sequences, _ in held for s in sequences])  # every client goes away
        while scheduler.stats()["active_sequences"] and asyncio.get_running_loop().time() - started < 5:
            await asyncio.sleep(0.01)
        stats = scheduler.stats()
        assert stats["active_sequences"] == stats["queued_sequences"] == 0
        assert stats["cancelled_total"] >= 4 and stats["rejected_total"] == 1
        assert stats["tokens_total"] < 100 * len(held)  # freed long before they could have finished
        texts, _ = await collect(scheduler, tokenizer, "still works")  # the freed slots are usable again
        assert texts[0]

    asyncio.run(run())


def test_a_prompt_too_long_for_the_context_fails_alone(scheduler, tokenizer, serve_log):
    async def run():
        sequences, queue = submit(scheduler, tokenizer, "word " * 400, request_id="chatcmpl-long")
        index, token, finished, reason, error = await asyncio.wait_for(queue.get(), 10)
        assert finished and error and "chatcmpl-long" in error and "max_seq_len" not in error  # details: the log
        texts, _ = await collect(scheduler, tokenizer, "short")
        assert texts[0]

    asyncio.run(run())
    log = "\n".join(serve_log)
    assert "prefill failed for request chatcmpl-long" in log and "max_seq_len" in log


# ------------------------------------------------------------------------------- failures, injected

def test_a_failing_prefill_fails_its_request_and_every_other_one_is_served(faulty, tokenizer, serve_log):
    async def run():
        return await asyncio.gather(
            collect(faulty, tokenizer, "first", max_tokens=30, request_id="a"),
            collect(faulty, tokenizer, "second", max_tokens=30, request_id="b"),
            collect(faulty, tokenizer, f"{FAIL_PREFILL} please", expect_error=True, request_id="chatcmpl-bad"),
            *[collect(faulty, tokenizer, f"waiting {i}", max_tokens=10, request_id=f"w{i}") for i in range(3)])

    first, second, error, *waiting = asyncio.run(asyncio.wait_for(run(), 60))
    assert "internal error" in error and "chatcmpl-bad" in error and "secret" not in error
    assert all(texts[0] and reasons[0] in ("length", "stop") for texts, reasons in [first, second, *waiting])
    log = "\n".join(serve_log)
    assert "prefill failed for request chatcmpl-bad" in log and "secret internal detail" in log
    assert faulty.alive and faulty.stats()["active_sequences"] == 0


def test_a_failing_step_fails_the_batch_and_the_waiting_requests_are_still_served(faulty, tokenizer):
    async def run():
        return await asyncio.gather(
            collect(faulty, tokenizer, f"{FAIL_STEP} now", max_tokens=50, expect_error=True, request_id="s"),
            collect(faulty, tokenizer, "beside it", max_tokens=50, expect_error=True, request_id="t"),
            *[collect(faulty, tokenizer, f"waiting {i}", max_tokens=10) for i in range(3)])

    failed, beside, *waiting = asyncio.run(asyncio.wait_for(run(), 60))
    assert "request id s" in failed and "request id t" in beside  # the batch it broke fails as a whole
    assert all(texts[0] for texts, _ in waiting) and faulty.alive


def test_a_dead_scheduler_fails_every_request_at_once_and_refuses_new_ones(faulty, tokenizer):
    async def run():
        started = time.monotonic()
        errors = await asyncio.gather(
            collect(faulty, tokenizer, "running", max_tokens=200, expect_error=True),
            collect(faulty, tokenizer, f"{KILL_SCHEDULER} now", max_tokens=200, expect_error=True),
            *[collect(faulty, tokenizer, f"waiting {i}", max_tokens=200, expect_error=True) for i in range(4)])
        return errors, time.monotonic() - started

    errors, seconds = asyncio.run(asyncio.wait_for(run(), 60))
    assert len(errors) == 6 and all("internal error" in e for e in errors)
    assert seconds < 5  # the waiting ones failed with the others, not after 200 steps each
    assert not faulty.alive
    with pytest.raises(Unavailable):
        asyncio.run(collect(faulty, tokenizer, "too late"))


def test_a_burst_of_prompts_is_prefilled_within_the_budget_between_decode_steps(engine, tokenizer):
    calls = FaultyEngine(engine, {"step_delay_s": 0.002})
    scheduler = Scheduler(calls, max_batch_size=8, max_queued=8, prefill_tokens_per_step=64)
    long_text = " ".join(f"word{i}" for i in range(40))  # ~80 prompt tokens: over the budget alone

    async def run():
        running = asyncio.ensure_future(collect(scheduler, tokenizer, "running", max_tokens=120))
        await asyncio.sleep(0.1)
        burst = [collect(scheduler, tokenizer, text, max_tokens=5) for text in
                 [long_text, long_text, "short one", "short two", "short three", long_text]]
        await asyncio.gather(running, *burst)

    try:
        asyncio.run(asyncio.wait_for(run(), 60))
    finally:
        scheduler.shutdown()
    between_steps, prefilled = [], []
    for kind, n in calls.calls:
        if kind == "add":
            prefilled.append(n)
        elif prefilled:
            between_steps.append(prefilled)
            prefilled = []
    assert sum(len(p) for p in between_steps) == 7
    assert all(len(p) == 1 or sum(p) <= 64 for p in between_steps), between_steps
    assert max(len(p) for p in between_steps) >= 2  # short prompts still go in together
