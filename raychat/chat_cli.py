"""`raychat serve` (start the Ray Serve chat service) and `raychat chat` (talk to a model in the terminal).

The service itself lives in serve/ (serve/app.py); raychat never imports it, it starts it by its import
path as `serve run` does, so `serve` must be importable: it is installed with the project
(`pip install -e .` installs both packages).

The terminal shows text from a model or from a server it does not control, so control characters are
removed before printing (an escape sequence can move the cursor, retitle the window or write the
clipboard), and a stream it cannot parse ends with one line, not a traceback.
"""
from __future__ import annotations

import importlib
import ipaddress
import json
import os
import secrets
import sys
import time

from raychat.common import UserError, checkpoint_dir, tokenizer_dir

APP_IMPORT_PATH = "serve.app:build_app"
API_KEY_ENV = "RAYCHAT_API_KEY"
EXIT_WORDS = {"/quit", "/exit", "quit", "exit"}
# C0 controls but tab and newline, DEL, and C1 controls: what a terminal acts on instead of printing
CONTROL_CHARACTERS = dict.fromkeys([*range(0x00, 0x09), *range(0x0b, 0x20), 0x7f, *range(0x80, 0xa0)])


def printable(text: str) -> str:
    """Text with the control characters removed (ESC starts every terminal escape sequence)."""
    return text.translate(CONTROL_CHARACTERS)


# --------------------------------------------------------------------------------------- raychat serve

def serve_main(cfg, args) -> int:
    source = args.source or cfg.serve.source
    if args.replicas is not None and args.replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {args.replicas}")
    host, port = cfg.serve.host, cfg.serve.port
    api_key = cfg.serve.api_key or os.environ.get(API_KEY_ENV, "")
    if not _is_loopback(host) and not api_key:
        print(f"raychat: warning: serving on {host}, not a loopback address, without an API key: anyone who can "
              f"reach this machine can use the service (set {API_KEY_ENV} or --set serve.api_key=...)",
              file=sys.stderr, flush=True)
    step = _check_checkpoint(cfg, source)

    from raychat.common import init_ray
    init_ray()
    from ray import serve

    module_name, _, attr = APP_IMPORT_PATH.partition(":")
    try:
        build_app = getattr(importlib.import_module(module_name), attr)
    except ImportError as error:
        raise UserError(f"cannot import {APP_IMPORT_PATH} ({error}): install the project with `pip install -e .` "
                        f"from the repository root") from None
    serve.start(http_options={"host": host, "port": port})
    app = build_app({"config": cfg.to_dict(), "source": source, "run": cfg.run.name, "step": step,
                     "replicas": args.replicas})
    try:
        serve.run(app, name="raychat", route_prefix="/", blocking=False)
    except RuntimeError as error:  # the replica could not start (e.g. out of memory): say why, briefly
        raise UserError(f"the chat service did not start: {str(error).splitlines()[0]}") from None
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    example = json.dumps({"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 64})
    auth = f" -H \"Authorization: Bearer ${API_KEY_ENV}\"" if api_key else ""
    print(f"\nraychat is serving the {source} checkpoint (run '{cfg.run.name}', "
          f"step {'latest' if step is None else step}) at {url}\n"
          f"  web UI:    open {url}/ in a browser{' (it asks for the API key)' if api_key else ''}\n"
          f"  API:       curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{example}'\n"
          f"  terminal:  raychat chat --url {url}{f' (with {API_KEY_ENV} set)' if api_key else ''}\n"
          f"  stats:     curl {url}/stats{auth}\n"
          f"Press Ctrl-C to stop.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping the chat service", flush=True)
        serve.shutdown()
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _check_checkpoint(cfg, source: str) -> int | None:
    """Fail here, with one line, rather than in a replica that Serve would keep restarting."""
    from raychat.checkpoint import latest_checkpoint, verify_checkpoint
    directory = checkpoint_dir(source, cfg.run.name, cfg.run.storage_path)
    if cfg.serve.step >= 0:
        verify_checkpoint(directory / f"step_{cfg.serve.step:06d}")
        step = cfg.serve.step
    elif latest_checkpoint(directory) is None:
        raise UserError(f"no {source} checkpoint in {directory}: train the {source} stage first "
                        f"(or choose another with --source)")
    else:
        step = None
    if not tokenizer_dir().exists():
        raise UserError(f"no tokenizer at {tokenizer_dir()}: run `raychat tokenizer train` first")
    return step


# ---------------------------------------------------------------------------------------- raychat chat

def chat_main(cfg, args) -> int:
    if not 0 <= args.temperature <= 2:  # written this way round so that NaN fails too
        raise UserError(f"--temperature must be between 0 and 2, got {args.temperature}")
    if args.top_k < 0 or args.top_k > 200:
        raise UserError(f"--top-k must be between 0 and 200, got {args.top_k}")
    if args.max_tokens < 1 or args.max_tokens > 4096:
        raise UserError(f"--max-tokens must be between 1 and 4096, got {args.max_tokens}")
    if args.url:
        reply = _RemoteChat(args.url.rstrip("/"), args)
    else:
        reply = _LocalChat(cfg, args.source or cfg.serve.source, args)
    messages: list[dict] = []
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        _print_reply(reply, messages)
        return 0
    print(f"raychat ({reply.name}); /clear starts a new conversation, /quit or Ctrl-D exits", flush=True)
    while True:
        try:
            text = input("\nyou> ").strip()
        except EOFError:
            print()
            return 0
        if not text:
            continue
        if text in EXIT_WORDS:
            return 0
        if text == "/clear":
            messages.clear()
            print("(new conversation)")
            continue
        messages.append({"role": "user", "content": text})
        try:
            _print_reply(reply, messages, prefix="raychat> ")
        except UserError as error:  # e.g. the conversation no longer fits: keep the session going
            messages.pop()
            print(f"\nerror: {error}", file=sys.stderr, flush=True)


def _print_reply(reply, messages: list[dict], prefix: str = "") -> None:
    print(prefix, end="", flush=True)
    parts = []
    for text in reply(messages):
        parts.append(text)
        print(printable(text), end="", flush=True)
    print(flush=True)
    messages.append({"role": "assistant", "content": "".join(parts)})


class _LocalChat:
    """Generate with a checkpoint in this process (no Ray)."""

    def __init__(self, cfg, source: str, args):
        from raychat.checkpoint import load_stage_model
        from raychat.common import detect_device
        from raychat.engine import Engine
        step = cfg.serve.step if cfg.serve.step >= 0 else None
        model, self.tokenizer, meta = load_stage_model(source, cfg.run.name, step, device=detect_device(),
                                                       storage_path=cfg.run.storage_path)
        model.eval()
        self.engine = Engine(model, self.tokenizer)
        self.context_len = model.config.sequence_len
        self.args = args
        self.name = f"{source} checkpoint, step {meta.get('step')}"
        self.terminal = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}

    def __call__(self, messages: list[dict]):
        from raychat.streaming import TextStream
        prompt = self.tokenizer.render_for_completion({"messages": messages})
        room = self.context_len - len(prompt)
        if room < 1:
            raise UserError(f"the conversation is {len(prompt)} tokens, over the model's context of "
                            f"{self.context_len}: /clear to start again")
        stream = TextStream(self.tokenizer)
        for tokens, _ in self.engine.generate(prompt, num_samples=1, max_tokens=min(self.args.max_tokens, room),
                                              temperature=self.args.temperature, top_k=self.args.top_k or None,
                                              seed=secrets.randbits(31)):
            if tokens[0] in self.terminal:
                break
            yield stream.push(tokens[0])
        yield stream.finish()


class _RemoteChat:
    """Stream from a running raychat service (or any OpenAI-compatible chat endpoint)."""

    def __init__(self, url: str, args):
        import httpx
        self.url, self.args, self.httpx = url, args, httpx
        key = os.environ.get(API_KEY_ENV)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            response = httpx.get(f"{url}/v1/models", headers=self.headers, timeout=10)
            if response.status_code == 401:
                raise UserError(f"the service at {url} needs an API key: set {API_KEY_ENV}")
            models = response.json()["data"]
            self.name = printable(f"{models[0]['id']} at {url}")
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as error:
            raise UserError(f"cannot reach a raychat service at {url}: {printable(str(error))}") from None

    def __call__(self, messages: list[dict]):
        body = {"messages": messages, "stream": True, "temperature": self.args.temperature,
                "top_k": self.args.top_k, "max_tokens": self.args.max_tokens}
        try:
            with self.httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, headers=self.headers,
                                   timeout=300) as response:
                if response.status_code != 200:
                    response.read()
                    raise UserError(f"the service answered {response.status_code}: {_error_message(response)}")
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    yield from _contents(line[6:])
        except self.httpx.HTTPError as error:
            raise UserError(f"lost the connection to {self.url}: {printable(str(error))}") from None


def _contents(data: str) -> list[str]:
    """The text of one streamed chunk (OpenAI's chat.completion.chunk), or a one-line UserError."""
    try:
        chunk = json.loads(data)
        if isinstance(chunk, dict) and "error" in chunk:
            raise UserError(f"the service failed: {printable(str(chunk['error'].get('message')))}")
        texts = [choice["delta"].get("content") for choice in chunk["choices"]]
        if not all(text is None or isinstance(text, str) for text in texts):
            raise TypeError("content is not text")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"the service sent a malformed stream event: {printable(data[:100])!r}") from None
    return [text for text in texts if text]


def _error_message(response) -> str:
    try:
        return printable(str(response.json()["error"]["message"]))
    except (ValueError, KeyError, TypeError):
        return printable(response.text[:200])
