"""The hand-written Rust pre-tokenizer must give exactly the chunks of the Python `regex` module."""
import random

import regex

from raychat.tokenizer import SPLIT_PATTERN, split_text

PATTERN = regex.compile(SPLIT_PATTERN)

TORTURE = [
    "",
    "Hello world",
    "  leading and trailing spaces   ",
    "tabs\tand\t\tmore\t",
    "line\nbreaks\n\n\nand\r\nCRLF\r\n\r\nand lone\rCR",
    "spaces before newline   \n   after\n",
    " \n \n\t\n",
    "\n\n\n",
    "x" + " " * 40 + "y" + "\t" * 17 + "\n" * 5 + " " * 9,
    "I'm, you're, he's, we'll, they've, I'd, it's",
    "I'M, YOU'RE, HE'S, WE'LL, THEY'VE, I'D, IT'S, DON'T",
    "mixed: We'Ll, tHeY'vE, i'D, 'S 'sup 'Don ''s '''",
    "long s: it'ſ and IT'ſ, ſhe",
    "apostrophe at the end'",
    "'",
    "numbers 1 12 123 1234 12345 3.14159 1,000,000 -42 +7",
    "other digits: ٣٤٥ ४५६ １２３ ²³ ½ ¾ Ⅻ ⅻ ① ௰ 𝟘𝟙",
    "digits4letters and letters4digits a1b2c3 ab12cd345",
    "emoji 🎉🎉 👩‍👩‍👧‍👦 family, 👍🏽 thumbs, 🇫🇷 flag, ❤️ heart",
    "CJK 你好，世界！こんにちは世界。안녕하세요 세계",
    "combining: e\u0301 a\u0300\u0316 n\u0303o Z\u0351\u0334\u0313a\u0336l\u0321g\u0315o\u035c",
    "arabic مرحبا بالعالم، hebrew שלום עולם, thai สวัสดีชาวโลก, devanagari नमस्ते दुनिया",
    "punctuation!!! ??? ... --- ((( ))) [[[ ]]] {{{ }}} <<<>>> @#$%^&*",
    " !!!\n\n after punctuation then newlines\r\n\r\n",
    "code: def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass\n",
    "url https://example.com/a/b?c=1&d=2#frag and mail a.b@c.de",
    "unicode spaces:\u00a0nbsp\u2003em\u3000ideographic\u2028line-sep\u2029para\u0085nel\u000bvt\u000cff",
    "zero width\u200bspace\ufeffbom\u180emongolian",
    "control \x00\x01\x1b[31mred\x1b[0m \x7f",
    "  \u00a0word",
    "\u00a0\u00a0\n",
    "😀" * 5 + " " + "a" * 3 + "\U0010FFFD",
    "mixed-script: Straße ΑΒΓ αβγ Ωmega ǅ ǈ ǋ ﬁ ﬂ",
    "math: ∑ᵢ xᵢ² ≤ ∫₀¹ f(x)dx ∀ε>0 ∃δ",
]


def check(text: str) -> None:
    assert split_text(text) == PATTERN.findall(text), repr(text)


def test_torture_corpus():
    for text in TORTURE:
        check(text)
    check("".join(TORTURE))
    check("\n".join(TORTURE))


# characters chosen to hit every alternative of the pattern and the boundaries between them
POOL = list("aZ09 '\t\r\n!.,-_sdmtlvreSDMTLVRE") + [
    "\u017f", "é", "\u0301", "ß", "你", "こ", "한", "ب", "٣", "४", "１", "²", "½", "Ⅻ", "\u00a0", "\u2028",
    "\u3000", "\u0085", "\u000b", "\u200b", "😀", "👍", "\U0001F3FD", "\u200d", "\ufe0f", "€", "\x00", "\x1f",
]


def random_text(rng: random.Random, length: int) -> str:
    out = []
    for _ in range(length):
        r = rng.random()
        if r < 0.85:
            out.append(rng.choice(POOL))
        else:  # any code point except surrogates (they cannot be UTF-8)
            cp = rng.randrange(0x110000 - 2048)
            out.append(chr(cp + 2048 if cp >= 0xD800 else cp))
    return "".join(out)


def test_random_strings():
    rng = random.Random(1234)
    for _ in range(3000):
        check(random_text(rng, rng.randrange(0, 40)))


def test_every_code_point_in_context():
    """Every code point, on its own and between letters, digits, spaces and apostrophes."""
    chars = [chr(cp) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    check("".join(chars))
    for sep in (" ", "a", "1", "'", "\n"):
        check(sep.join(chars[::7]) + sep)
