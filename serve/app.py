"""The raychat chat service: a Ray Serve deployment with a FastAPI ingress.

    GET  /                     the web UI (serve/static/index.html)
    POST /v1/chat/completions  OpenAI-compatible chat completions, streamed (SSE) or not
    GET  /v1/models            the one model this service serves
    GET  /health               200 while the replica's scheduler runs
    GET  /stats                replicas, queue depth, tokens/s (of the replica that answers)

Each replica loads one checkpoint and decodes every request it holds in one batch (serve/scheduler.py).
Start it with `raychat serve --preset demo`, `serve run serve.app:build_app preset=demo`, or
`serve deploy serve/config.yaml` on a cluster.
"""
# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation, and the
# class is shipped to the replica by value, where a string annotation can no longer be resolved.
import asyncio
import os
import secrets
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve

from raychat.common import get_logger
from raychat.config import Config, load_config
from raychat.streaming import TextStream
from serve.protocol import APIError, Limits, SamplingParams, conversation, parse_chat_request, sse
from serve.scheduler import Overloaded, Scheduler, Sequence

log = get_logger("raychat.serve")
STATIC = Path(__file__).resolve().parent / "static"
DEPLOYMENT = "ChatService"
APP_NAME = "raychat"

app = FastAPI(title="raychat", docs_url=None, redoc_url=None)


# Helpers are defined before the deployment class: Serve ships the class to the replica by value (the
# module name `ChatService` is the Deployment, not the class), and module names defined after the class
# were missing there (NameError in the replica).

async def _decode(tokenizer, sequences: list[Sequence], queue: asyncio.Queue, params: SamplingParams,
                  scheduler: Scheduler, interval: float = 0.0):
    """Tokens of one request's sequences -> ({choice: new text}, {choice: finish_reason}, error, tokens so far).

    Takes everything that arrived since the last wake-up at once, so a client that falls behind gets
    fewer, larger chunks instead of a growing backlog. With `interval` > 0 it waits that long after each
    piece of text (the first one goes out at once): each chunk costs Serve's proxy and the replica CPU
    that a fast model would otherwise use for decoding. On exit (done, error, or the consumer closed it
    because the client disconnected) the sequences still running are cancelled, freeing their slots.
    """
    streams = [TextStream(tokenizer, params.stop) for _ in sequences]
    live = set(range(len(sequences)))
    tokens = 0
    try:
        while live:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            deltas: dict[int, str] = {}
            finished: dict[int, str] = {}
            for index, token, done, reason, error in items:
                if index not in live:
                    continue
                if error:
                    yield {}, {}, error, tokens
                    return
                text = ""
                if token is not None:
                    tokens += 1
                    text = streams[index].push(token)
                if streams[index].stopped:  # a stop string: the answer ends here
                    done, reason = True, "stop"
                    scheduler.cancel([sequences[index]])
                if done:
                    text += streams[index].finish()
                    finished[index] = reason or "stop"
                    live.discard(index)
                if text:
                    deltas[index] = deltas.get(index, "") + text
            yield deltas, finished, None, tokens
            if interval and deltas and live:
                await asyncio.sleep(interval)
    finally:
        scheduler.cancel([s for i, s in enumerate(sequences) if i in live])


def _running_replicas() -> int | None:
    """How many replicas of the chat deployment are running (asks the Serve controller)."""
    try:
        status = serve.status().applications[serve.get_replica_context().app_name].deployments[DEPLOYMENT]
        return int(status.replica_states.get("RUNNING", 0))
    except Exception:  # the controller is busy or restarting: /stats still answers
        return None



@serve.deployment(name=DEPLOYMENT)
@serve.ingress(app)
class ChatService:
    def __init__(self, config: dict, source: str, run: str = "default", step: int | None = None):
        import torch

        from raychat.checkpoint import load_stage_model
        from raychat.engine import Engine

        cfg = Config.from_dict(config)
        self.cfg = cfg.serve
        device = "cuda" if cfg.serve.use_gpu and torch.cuda.is_available() else "cpu"
        model, self.tokenizer, meta = load_stage_model(source, run, step, device=device,
                                                    storage_path=cfg.run.storage_path)
        model.eval()
        self.context_len = model.config.sequence_len
        self.scheduler = Scheduler(Engine(model, self.tokenizer), max_batch_size=cfg.serve.max_batch_size,
                                   max_queued=cfg.serve.max_queued)
        self.limits = Limits(max_messages=cfg.serve.max_messages, max_chars_per_message=cfg.serve.max_chars_per_message,
                             max_total_chars=cfg.serve.max_total_chars, default_max_tokens=cfg.serve.default_max_tokens)
        self.model_id = f"raychat-{source}"
        self.model_info = {"id": self.model_id, "object": "model", "created": int(time.time()), "owned_by": "raychat",
                           "source": source, "run": run, "step": meta.get("step"),
                           "depth": model.config.depth,
                           "context_length": self.context_len, "device": device}
        self.index_html = (STATIC / "index.html").read_text(encoding="utf-8")
        log.info(f"serving {source}/{run} step {meta.get('step')} on {device}: batch {cfg.serve.max_batch_size}, "
                 f"queue {cfg.serve.max_queued}")

    # Serve calls this periodically; raising restarts the replica
    def check_health(self) -> None:
        if not self.scheduler.alive:
            raise RuntimeError("the scheduler thread has stopped")

    # --------------------------------------------------------------------------------- small routes
    @app.get("/", response_class=HTMLResponse)
    async def index(self) -> HTMLResponse:
        return HTMLResponse(self.index_html)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        if not self.scheduler.alive:
            return JSONResponse({"status": "error", "detail": "scheduler stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_id})

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self.model_info]})

    @app.get("/stats")
    async def stats(self) -> JSONResponse:
        context = serve.get_replica_context()
        return JSONResponse({"model": self.model_id, "replicas": await asyncio.to_thread(_running_replicas),
                             "replica": context.replica_id.unique_id, **self.scheduler.stats()})

    # ----------------------------------------------------------------------------- chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        try:
            length = request.headers.get("content-length") or "0"
            length = int(length) if length.isdigit() else 0  # a bad header: the body's real size decides
            if length > self.limits.max_body_bytes:  # refuse before reading a huge body
                raise APIError(413, f"request body is {length} bytes; the limit is {self.limits.max_body_bytes}")
            chat, params = parse_chat_request(await request.body(), self.limits)
            prompt = self.tokenizer.render_for_completion(conversation(chat))
            room = self.context_len - len(prompt)
            if room < 1:
                raise APIError(400, f"messages: the conversation is {len(prompt)} tokens; the model's context is "
                                    f"{self.context_len} tokens", param="messages", code="context_length_exceeded")
            max_tokens = min(params.max_tokens, room)
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            seeds = [params.seed + i if params.seed is not None else secrets.randbits(62) for i in range(params.n)]
            sequences = [Sequence(prompt=prompt, max_tokens=max_tokens, temperature=params.temperature,
                                  top_k=params.top_k, top_p=params.top_p, seed=seeds[i], index=i,
                                  queue=queue, loop=loop) for i in range(params.n)]
            self.scheduler.submit(sequences)
        except APIError as error:
            return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
        except Overloaded as error:
            return JSONResponse(APIError(429, str(error), code="overloaded").body(), status_code=429,
                                headers={"Retry-After": str(error.retry_after)})
        except Exception as error:  # a bug must cost one request a 500, never the replica
            log.exception("chat completion failed")
            return JSONResponse(APIError(500, f"internal error: {type(error).__name__}", code="internal").body(),
                                status_code=500)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        decoded = _decode(self.tokenizer, sequences, queue, params, self.scheduler,
                          interval=self.cfg.stream_interval_ms / 1000 if chat.stream else 0.0)
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(self._stream(decoded, completion_id, params.n, len(prompt), include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(decoded, completion_id, params.n, len(prompt))

    async def _stream(self, decoded, completion_id: str, n: int, prompt_tokens: int, include_usage: bool):
        created = int(time.time())

        def chunk(choices: list, usage: dict | None = None) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_id, "choices": choices}
            if include_usage:
                body["usage"] = usage
            return sse(body)

        completion_tokens = 0
        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(n)])
            async for deltas, finished, error, tokens in decoded:
                completion_tokens = tokens
                if error:
                    yield sse(APIError(500, error, code="generation_failed").body())
                    break
                out = "".join(chunk([{"index": i, "delta": {"content": text}, "finish_reason": None}])
                              for i, text in deltas.items() if text)
                out += "".join(chunk([{"index": i, "delta": {}, "finish_reason": reason}])
                               for i, reason in finished.items())
                if out:
                    yield out
            if include_usage:
                yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens})
            yield sse("[DONE]")
        finally:
            await decoded.aclose()  # a client that went away frees its slots now

    async def _complete(self, decoded, completion_id: str, n: int, prompt_tokens: int) -> JSONResponse:
        texts, reasons, completion_tokens = [""] * n, [None] * n, 0
        try:
            async for deltas, finished, error, tokens in decoded:
                if error:
                    return JSONResponse(APIError(500, error, code="generation_failed").body(), status_code=500)
                for i, text in deltas.items():
                    texts[i] += text
                reasons = [finished.get(i, r) for i, r in enumerate(reasons)]
                completion_tokens = tokens
        finally:
            await decoded.aclose()
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_id,
            "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": reasons[i]}
                        for i in range(n)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })


# ----------------------------------------------------------------------------------------- building

def deployment_options(cfg: Config, replicas: int | None = None, base_dir: str | None = None) -> dict:
    """Serve options of the chat deployment from the `serve` config section."""
    s = cfg.serve
    env = {"RAYCHAT_BASE_DIR": base_dir} if base_dir else {}
    options = {
        # room for every batch slot and queued request plus /health and /stats; past that our own 429
        # answers, not Serve's unbounded router queue
        "max_ongoing_requests": s.max_batch_size + s.max_queued + 16,
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": 1 if s.use_gpu else 0,
                              **({"runtime_env": {"env_vars": env}} if env else {})},
        "logging_config": {"enable_access_log": s.access_log},
        "health_check_period_s": 10,
    }
    if replicas is not None:
        options["num_replicas"] = replicas
    elif s.max_replicas > s.min_replicas:
        options["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                         "initial_replicas": max(s.min_replicas, 1),
                                         "target_ongoing_requests": s.target_ongoing_requests}
    else:
        options["num_replicas"] = s.num_replicas
    return options


def build_app(args: dict):
    """Serve application builder (`serve run serve.app:build_app preset=demo source=base`).

    args: preset (default d20) and set (a list of section.field=value overrides, or one such string), or
    config (a whole `Config.to_dict()`, as `raychat serve` passes it); source (default: the config's
    serve.source), run, step (default: serve.step, -1 = the latest), replicas, base_dir (the checkpoints'
    RAYCHAT_BASE_DIR for the replicas; default: this process's RAYCHAT_BASE_DIR).
    """
    if args.get("config"):
        cfg = Config.from_dict(args["config"])
    else:
        overrides = args.get("set") or []
        cfg = load_config(args.get("preset", "d20"), [overrides] if isinstance(overrides, str) else list(overrides))
    source = args.get("source") or cfg.serve.source
    step = args.get("step")
    if step is None and cfg.serve.step >= 0:
        step = cfg.serve.step
    replicas = args.get("replicas")
    base_dir = args.get("base_dir") or os.environ.get("RAYCHAT_BASE_DIR")
    options = deployment_options(cfg, int(replicas) if replicas is not None else None, base_dir)
    return ChatService.options(**options).bind(cfg.to_dict(), source, args.get("run") or cfg.run.name,
                                               int(step) if step is not None else None)
