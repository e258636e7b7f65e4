"""`raychat chat` and `raychat serve` against what they cannot trust, without Ray: a hostile
OpenAI-compatible server (terminal escape sequences in the text, malformed stream events), NaN
sampling flags, binding beyond loopback without a key; and the bounds of every serve limit."""
import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from raychat.cli import main
from raychat.config import ConfigError, ServeConfig, load_config

# what the hostile server streams, by the first segment of the URL path (raychat chat --url .../<name>)
STREAMS = {
    "escapes": [{"choices": [{"delta": {"content": text}}]} for text in
                ["Hello \x1b[2J\x1b]0;pwned\x07", "world\r\n", "\x1b", "[31mred \x9b2J", "\x07end\x7f"]],
    "not-json": ["{not json"],
    "no-choices": [{"id": 1}],
    "bad-delta": [{"choices": [{"delta": "text"}]}],
    "a-list": [[1, 2]],
    "number-content": [{"choices": [{"delta": {"content": 5}}]}],
    "error": [{"error": {"message": "boom\x1b]52;c;cGF5bG9hZA==\x07 done"}}],
}
TERMINAL_CONTROLS = {chr(c) for c in [*range(0x00, 0x09), *range(0x0b, 0x20), 0x7f, *range(0x80, 0xa0)]}


class HostileHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, "application/json", json.dumps({"data": [{"id": "hostile\x1b]0;title\x07"}]}).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        events = STREAMS[self.path.strip("/").split("/")[0]]
        body = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        self._send(200, "text/event-stream", body.encode())


@pytest.fixture(scope="module")
def hostile():
    server = ThreadingHTTPServer(("127.0.0.1", 0), HostileHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_model_text_reaches_the_terminal_without_control_characters(hostile, capsys):
    assert main(["chat", "--url", f"{hostile}/escapes", "-p", "hi"]) == 0
    out = capsys.readouterr().out
    assert not TERMINAL_CONTROLS & set(out), repr(out)
    assert out == "Hello [2J]0;pwnedworld\n[31mred 2Jend\n"  # the text stays; only what a terminal would act on goes


@pytest.mark.parametrize("stream", ["not-json", "no-choices", "bad-delta", "a-list", "number-content"])
def test_a_malformed_stream_event_is_one_clear_line(hostile, capsys, stream):
    assert main(["chat", "--url", f"{hostile}/{stream}", "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raychat: error: the service sent a malformed stream event") and err.count("\n") == 1


def test_an_error_event_is_printed_without_its_escape_sequences(hostile, capsys):
    assert main(["chat", "--url", f"{hostile}/error", "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert "the service failed: boom" in err and "done" in err and not TERMINAL_CONTROLS & set(err.rstrip("\n"))


@pytest.mark.parametrize("value", ["nan", "inf", "-0.5", "2.5"])
def test_temperature_out_of_range_or_nan_is_one_line(hostile, capsys, value):
    assert main(["chat", "--url", f"{hostile}/escapes", "-p", "hi", "--temperature", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raychat: error: --temperature must be between 0 and 2") and "Traceback" not in err


def test_serving_beyond_loopback_without_a_key_warns_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(tmp_path))  # no checkpoint: serve stops right after its checks
    monkeypatch.delenv("RAYCHAT_API_KEY", raising=False)

    def serve(*overrides):
        args = ["serve", "--preset", "demo"] + [item for o in overrides for item in ("--set", o)]
        assert main(args) == 2
        return [line for line in capsys.readouterr().err.splitlines() if "warning" in line]

    warnings = serve("serve.host=0.0.0.0")
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "RAYCHAT_API_KEY" in warnings[0]
    assert serve("serve.host=chat.example.com")
    assert not serve("serve.host=127.0.0.1") and not serve("serve.host=::1")
    assert not serve("serve.host=0.0.0.0", "serve.api_key=secret")
    monkeypatch.setenv("RAYCHAT_API_KEY", "secret")
    assert not serve("serve.host=0.0.0.0")


def test_every_serve_limit_has_an_upper_bound():
    numeric = [f for f in dataclasses.fields(ServeConfig) if f.type in ("int", "float")]
    unbounded = [f.name for f in numeric if f.metadata.get("max") is None]
    assert not unbounded
    for f in numeric:
        with pytest.raises(ConfigError, match=rf"^serve\.{f.name} must be <= "):
            load_config("demo", [f"serve.{f.name}={f.metadata['max'] * 2 + 1}"])
