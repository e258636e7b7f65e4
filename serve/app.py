"""The raychat chat service: a Ray Serve deployment with a FastAPI ingress.

    GET  /                     the web UI (serve/static/index.html)
    POST /v1/chat/completions  OpenAI-compatible chat completions, streamed (SSE) or not
    GET  /v1/models            the one model this service serves
    GET  /health               200 while the replica's scheduler runs
    GET  /stats                replicas, queue depth, tokens/s (of the replica that answers)

Each replica loads one checkpoint and decodes every request it holds in one batch (serve/scheduler.py).
A request passes serve/guard.py (Host, API key, content type, body size and deadline) and
serve/protocol.py (the JSON) before it reaches the model. Its sequences are cancelled however it ends:
finished, failed, or its client gone at any point, whether or not Serve's proxy noticed (a client can
tell the proxy to stop watching with a header), so a request never decodes for nobody.
Start it with `raychat serve --preset demo`, `serve run serve.app:build_app preset=demo`, or
`serve deploy serve/config.yaml` on a cluster.
"""
# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation, and the
# class is shipped to the replica by value, where a string annotation can no longer be resolved.
import asyncio
import base64
import hashlib
import os
import re
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
from serve.guard import allowed_host_names, check_api_key, check_host, check_json_content_type, read_body
from serve.protocol import APIError, Limits, SamplingParams, conversation, parse_chat_request, sse
from serve.scheduler import Overloaded, Scheduler, Sequence, Unavailable, internal_error

log = get_logger("raychat.serve")
STATIC = Path(__file__).resolve().parent / "static"
DEPLOYMENT = "ChatService"
APP_NAME = "raychat"
API_KEY_ENV = "RAYCHAT_API_KEY"

app = FastAPI(title="raychat", docs_url=None, redoc_url=None, openapi_url=None)


# Helpers are defined before the deployment class: Serve ships the class to the replica by value (the
# module name `ChatService` is the Deployment, not the class), and module names defined after the class
# were missing there (NameError in the replica). The exception handler must be registered before
# `@serve.ingress(app)`, which freezes a copy of the app.

@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


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


class _GenerationStream(StreamingResponse):
    """A streamed completion that cancels its sequences however the response ends: finished, failed,
    cancelled by Serve, or the client gone before the first byte (when the body generator may never have
    started, so its own cleanup never runs)."""

    def __init__(self, content, scheduler: Scheduler, sequences: list[Sequence]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.scheduler, self.sequences = scheduler, sequences

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.scheduler.cancel(self.sequences)


async def _until_disconnected(receive) -> None:
    """Returns when the client has gone (the body has been read already, so nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _content_security_policy(html: str) -> str:
    """The UI page may run its own inline script and style (pinned by hash) and talk to this origin only."""
    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
            f"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


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
                                   max_queued=cfg.serve.max_queued,
                                   prefill_tokens_per_step=cfg.serve.prefill_tokens_per_step)
        self.limits = Limits(max_messages=cfg.serve.max_messages, max_chars_per_message=cfg.serve.max_chars_per_message,
                             max_total_chars=cfg.serve.max_total_chars, default_max_tokens=cfg.serve.default_max_tokens,
                             max_batch_size=cfg.serve.max_batch_size,
                             max_tokens_per_request=cfg.serve.max_tokens_per_request)
        self.api_key = cfg.serve.api_key or os.environ.get(API_KEY_ENV, "")
        self.allowed_hosts = allowed_host_names(cfg.serve.allowed_hosts, cfg.serve.host)
        self.model_id = f"raychat-{source}"
        self.model_info = {"id": self.model_id, "object": "model", "created": int(time.time()), "owned_by": "raychat",
                           "source": source, "run": run, "step": meta.get("step"),
                           "depth": model.config.depth,
                           "context_length": self.context_len, "device": device}
        self.index_html = (STATIC / "index.html").read_text(encoding="utf-8")
        self.page_headers = {"Content-Security-Policy": _content_security_policy(self.index_html),
                             "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
        log.info(f"serving {source}/{run} step {meta.get('step')} on {device}: batch {cfg.serve.max_batch_size}, "
                 f"queue {cfg.serve.max_queued}, API key {'required' if self.api_key else 'off'}, "
                 f"hosts {', '.join(sorted(self.allowed_hosts)) if self.allowed_hosts else 'any'}")

    # Serve calls this periodically; raising restarts the replica
    def check_health(self) -> None:
        if not self.scheduler.alive:
            raise RuntimeError("the scheduler thread has stopped")

    def _check_access(self, request: Request) -> None:
        """Host and API key: every route but /health."""
        check_host(request, self.allowed_hosts)
        check_api_key(request, self.api_key)

    # --------------------------------------------------------------------------------- small routes
    @app.get("/", response_class=HTMLResponse)
    async def index(self, request: Request) -> HTMLResponse:
        # the page itself holds no data (everything it shows comes from the API, which needs the key)
        check_host(request, self.allowed_hosts)
        return HTMLResponse(self.index_html, headers=self.page_headers)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        if not self.scheduler.alive:
            return JSONResponse({"status": "error", "detail": "scheduler stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_id})

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._check_access(request)
        return JSONResponse({"object": "list", "data": [self.model_info]})

    @app.get("/stats")
    async def stats(self, request: Request) -> JSONResponse:
        self._check_access(request)
        context = serve.get_replica_context()
        return JSONResponse({"model": self.model_id, "replicas": await asyncio.to_thread(_running_replicas),
                             "replica": context.replica_id.unique_id, **self.scheduler.stats()})

    # ----------------------------------------------------------------------------- chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            return await self._chat_completions(request, completion_id)
        except APIError:
            raise
        except Exception:  # a bug must cost one request a 500, never the replica; the client gets no details
            log.exception(f"chat completion {completion_id} failed")
            raise APIError(500, internal_error(completion_id), code="internal") from None

    async def _chat_completions(self, request: Request, completion_id: str):
        self._check_access(request)
        check_json_content_type(request)
        body = await read_body(request, self.limits.max_body_bytes, self.cfg.body_timeout_s)
        chat, params = parse_chat_request(body, self.limits)
        # off the event loop: a long conversation must not hold up every other stream of this replica
        prompt = await asyncio.to_thread(self.tokenizer.render_for_completion, conversation(chat))
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
                              queue=queue, loop=loop, request_id=completion_id) for i in range(params.n)]
        try:
            self.scheduler.submit(sequences)
        except Overloaded as error:
            raise APIError(429, str(error), code="overloaded", headers={"Retry-After": str(error.retry_after)}) from None
        except Unavailable as error:
            raise APIError(503, str(error), code="unavailable") from None
        decoded = _decode(self.tokenizer, sequences, queue, params, self.scheduler,
                          interval=self.cfg.stream_interval_ms / 1000 if chat.stream else 0.0)
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return _GenerationStream(self._stream(decoded, completion_id, params.n, len(prompt), include_usage),
                                     self.scheduler, sequences)
        try:
            return await self._complete(decoded, request, completion_id, params.n, len(prompt))
        finally:
            self.scheduler.cancel(sequences)

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

    async def _complete(self, decoded, request: Request, completion_id: str, n: int,
                        prompt_tokens: int) -> JSONResponse:
        """Collect the whole answer, unless the client leaves first (noticed here, not only by Serve)."""
        collect = asyncio.ensure_future(self._collect(decoded, n))
        gone = asyncio.ensure_future(_until_disconnected(request.receive))
        try:
            await asyncio.wait([collect, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (collect, gone):
                task.cancel()
            await asyncio.gather(collect, gone, return_exceptions=True)
            await decoded.aclose()
        if collect.cancelled():  # the client has gone: nobody reads this answer
            raise APIError(400, "the client disconnected", code="client_disconnected")
        texts, reasons, completion_tokens, error = collect.result()
        if error:
            return JSONResponse(APIError(500, error, code="generation_failed").body(), status_code=500)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_id,
            "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": reasons[i]}
                        for i in range(n)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    @staticmethod
    async def _collect(decoded, n: int) -> tuple[list[str], list, int, str | None]:
        texts, reasons, completion_tokens = [""] * n, [None] * n, 0
        async for deltas, finished, error, tokens in decoded:
            if error:
                return texts, reasons, completion_tokens, error
            for i, text in deltas.items():
                texts[i] += text
            reasons = [finished.get(i, r) for i, r in enumerate(reasons)]
            completion_tokens = tokens
        return texts, reasons, completion_tokens, None


# ----------------------------------------------------------------------------------------- building

def deployment_options(cfg: Config, replicas: int | None = None, base_dir: str | None = None) -> dict:
    """Serve options of the chat deployment from the `serve` config section."""
    s = cfg.serve
    env = {"RAYCHAT_BASE_DIR": base_dir} if base_dir else {}
    if os.environ.get(API_KEY_ENV):  # `RAYCHAT_API_KEY=... serve run ...`: the replicas need it too
        env[API_KEY_ENV] = os.environ[API_KEY_ENV]
    options = {
        # room for every batch slot and queued request plus /health and /stats; past that our own 429
        # answers, and past Serve's bounded router queue Serve itself answers 429
        "max_ongoing_requests": s.max_batch_size + s.max_queued + 16,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
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
