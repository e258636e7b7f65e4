"""Token ids in, text out, one token at a time: what a chat stream shows the user.

Three things make this more than `tokenizer.decode([token])`:
- UTF-8: a byte-level BPE token can end in the middle of a multi-byte character (an emoji is often two
  or three tokens). Decoding such a token alone gives U+FFFD, so the stream holds those tokens back
  until the character is complete and then emits it whole.
- Tool calls: the calculator's special tokens are shown as GSM8K's `<<expression=result>>` notation
  instead of special-token names; other special tokens are not text and show nothing.
- Stop strings: text that might be the start of a stop string is held back until it is clear that it
  is not; when one appears, the text before it is the end of the answer.

Used by the Serve app (one `TextStream` per sampled sequence) and by `raychat chat`.
"""
from __future__ import annotations

# how the calculator's tokens are shown: python_start 48/2 python_end output_start 24 output_end -> <<48/2=24>>
TOOL_MARKERS = {"<|python_start|>": "<<", "<|python_end|>": "=", "<|output_start|>": "", "<|output_end|>": ">>"}
# a character is at most 4 bytes, but one token may end a character and start the next; past this many
# held tokens the bytes are really invalid (the model emitted junk) and are shown as U+FFFD
MAX_HELD_TOKENS = 8
REPLACEMENT = "\ufffd"


class TextStream:
    """Turns one sequence's token ids into text deltas. `push(id)` returns the text that is safe to show
    now (possibly ""); `finish()` returns what is still held back. After a stop string, `stopped` is True
    and everything later is ignored."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.stopped = False
        self.text = ""                   # everything emitted so far
        self._held_ids: list[int] = []   # tokens whose bytes do not yet end on a character boundary
        self._held_text = ""             # decoded text that may be the start of a stop string
        self._markers: dict[int, str] = {}
        for name, shown in TOOL_MARKERS.items():
            self._markers[tokenizer.encode_special(name)] = shown
        self._specials = set(_special_ids(tokenizer)) - set(self._markers)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        if token in self._markers or token in self._specials:
            # a special token is a character boundary: whatever was held is as complete as it will get
            text = self._decode_held(final=True) + self._markers.get(token, "")
        else:
            self._held_ids.append(token)
            text = self._decode_held(final=False)
        return self._emit(text)

    def finish(self) -> str:
        """End of the sequence: release what was held (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        text = self._emit(self._decode_held(final=True))
        if self.stopped:
            return text
        tail, self._held_text = self._held_text, ""
        self.text += tail
        return text + tail

    def _decode_held(self, final: bool) -> str:
        if not self._held_ids:
            return ""
        text = self.tokenizer.decode(self._held_ids)
        if text.endswith(REPLACEMENT) and not final and len(self._held_ids) < MAX_HELD_TOKENS:
            return ""  # the last character is not complete yet
        self._held_ids = []
        return text

    def _emit(self, text: str) -> str:
        """Apply the stop strings to newly decoded text; return what can be shown."""
        if not text:
            return ""
        buffer = self._held_text + text
        if self.stop:
            cut = min((i for i in (buffer.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                self._held_text = ""
                self.text += buffer[:cut]
                return buffer[:cut]
            keep = max((_overlap(buffer, s) for s in self.stop), default=0)
        else:
            keep = 0
        self._held_text = buffer[len(buffer) - keep:] if keep else ""
        shown = buffer[:len(buffer) - keep]
        self.text += shown
        return shown


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def _special_ids(tokenizer) -> list[int]:
    from raychat.tokenizer import SPECIAL_TOKENS
    return [tokenizer.encode_special(name) for name in SPECIAL_TOKENS]
