"""RustBPETokenizer: encoding, special tokens, storage, fingerprint (fast; uses the session `tokenizer`)."""
import random
import re

import pyarrow.parquet as pq
import pytest
import torch

from raychat.common import UserError
from raychat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, get_tokenizer


def test_vocab_layout(tokenizer):
    assert tokenizer.get_vocab_size() == 1024
    # the special tokens are the last 9 ids, in the agreed order
    assert [tokenizer.encode_special(s) for s in SPECIAL_TOKENS] == list(range(1024 - 9, 1024))
    assert tokenizer.get_bos_token_id() == 1024 - 9
    with pytest.raises(ValueError, match="unknown special token"):
        tokenizer.encode_special("<|nope|>")


def test_encode_decode_and_prepend_append(tokenizer):
    text = "Hello world! The tokenizer's 2nd test: 12345 émojis 🎉\r\n\n\ttabs"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < 1024 - 9 for i in ids)
    bos = tokenizer.get_bos_token_id()
    end = tokenizer.encode_special("<|assistant_end|>")
    assert tokenizer.encode(text, prepend="<|bos|>", append=end) == [bos] + ids + [end]
    batch = tokenizer.encode([text, "", "abc"], prepend=bos)
    assert batch == [[bos] + ids, [bos], [bos] + tokenizer.encode("abc")]


def test_user_text_never_produces_special_tokens(tokenizer):
    text = "<|bos|><|user_start|>hi<|assistant_end|>"
    ids = tokenizer.encode(text)
    assert not set(ids) & set(range(1024 - 9, 1024))
    assert tokenizer.decode(ids) == text


def test_token_bytes(tokenizer):
    tb = tokenizer.token_bytes
    assert tb.dtype == torch.int32 and tb.shape == (1024,)
    assert tb[:256].tolist() == [1] * 256 and tb[-9:].tolist() == [0] * 9
    for i in (300, 700, 1000):
        assert tb[i].item() == len(tokenizer.enc.decode_single_token_bytes(i))


def test_save_load_fingerprint(tokenizer, tmp_path):
    directory = tokenizer.save(tmp_path / "tok")
    loaded = RustBPETokenizer.from_directory(directory)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert loaded.merges == tokenizer.merges
    text = "Saving and loading keeps every id."
    assert loaded.encode(text) == tokenizer.encode(text)
    assert torch.equal(torch.load(directory / "token_bytes.pt"), tokenizer.token_bytes)
    # saving again replaces the directory as a whole and leaves no temp dirs behind
    tokenizer.save(directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    assert get_tokenizer(directory).fingerprint() == tokenizer.fingerprint()


def test_missing_or_corrupt_tokenizer(tmp_path, tokenizer):
    with pytest.raises(UserError, match="run `raychat tokenizer train` first"):
        get_tokenizer(tmp_path / "none")
    directory = tokenizer.save(tmp_path / "tok")
    (directory / "bpe.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        get_tokenizer(directory)


def test_fingerprint_changes_with_merges(tokenizer):
    other = RustBPETokenizer(tokenizer.merges[:-1])
    assert other.fingerprint() != tokenizer.fingerprint()
    assert RustBPETokenizer(list(tokenizer.merges)).fingerprint() == tokenizer.fingerprint()


# ------------------------------------------------------------------------------------------- chat

def sp(tokenizer, name):
    return tokenizer.encode_special(name)


def test_render_conversation_every_part_type(tokenizer):
    t = tokenizer
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "6*7"},
            {"type": "python_output", "text": "42"},
            {"type": "text", "text": "It is 42."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    ids, mask = t.render_conversation(conversation)
    e = t.encode
    expected = [
        (sp(t, "<|bos|>"), 0), (sp(t, "<|user_start|>"), 0), *[(i, 0) for i in e("Be brief.\n\nWhat is 6*7?")],
        (sp(t, "<|user_end|>"), 0), (sp(t, "<|assistant_start|>"), 0),
        *[(i, 1) for i in e("Let me compute.")],
        (sp(t, "<|python_start|>"), 1), *[(i, 1) for i in e("6*7")], (sp(t, "<|python_end|>"), 1),
        (sp(t, "<|output_start|>"), 0), *[(i, 0) for i in e("42")], (sp(t, "<|output_end|>"), 0),
        *[(i, 1) for i in e("It is 42.")], (sp(t, "<|assistant_end|>"), 1),
        (sp(t, "<|user_start|>"), 0), *[(i, 0) for i in e("Thanks")], (sp(t, "<|user_end|>"), 0),
        (sp(t, "<|assistant_start|>"), 0), *[(i, 1) for i in e("You're welcome.")], (sp(t, "<|assistant_end|>"), 1),
    ]
    assert list(zip(ids, mask)) == expected
    # truncation keeps the prefix of both
    short_ids, short_mask = t.render_conversation(conversation, max_tokens=10)
    assert short_ids == ids[:10] and short_mask == mask[:10]
    # a plain list of messages works the same
    assert t.render_conversation(conversation["messages"]) == (ids, mask)


def test_render_for_completion(tokenizer):
    t = tokenizer
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    prompt = t.render_for_completion(messages)
    expected = [sp(t, "<|bos|>"), sp(t, "<|user_start|>"), *t.encode("Hi"), sp(t, "<|user_end|>"),
                sp(t, "<|assistant_start|>")]
    assert prompt == expected
    assert t.render_for_completion(messages[:1]) == expected  # a conversation that ends with the user


@pytest.mark.parametrize("conversation, message", [
    ([], "conversation is empty"),
    ({"turns": []}, "no 'messages' key"),
    ("hello", "must be a list of messages"),
    ([{"role": "assistant", "content": "hi"}], "message 0 has role 'assistant', expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
     "a system message is only allowed first"),
    ([{"role": "system", "content": "s"}], "must be followed by a user message"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 1 has role 'bot'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "unknown part type 'image'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}],
     "'text' must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": []}], "content has no parts"),
    ([{"role": "user", "content": ["a"]}], "content must be a string"),
    ([{"role": "user"}], "must be a dict with 'role' and 'content'"),
])
def test_malformed_conversations(tokenizer, conversation, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tokenizer.render_conversation(conversation)


def test_render_for_completion_errors(tokenizer):
    with pytest.raises(ValueError, match="conversation is empty"):
        tokenizer.render_for_completion([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="expected 'user'"):
        tokenizer.render_for_completion([{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}])


# ---------------------------------------------------------------------------------------- HF export

def test_export_hf_gives_identical_ids(tokenizer, tmp_path, data_dir):
    from tokenizers import Tokenizer

    from test_tokenizer_split import TORTURE, random_text

    hf = Tokenizer.from_file(str(tokenizer.export_hf(tmp_path / "tokenizer.json")))
    val = sorted((data_dir / "pretrain" / "shards").glob("*.parquet"))[-1]
    texts = [t[:5000] for t in pq.read_table(val, columns=["text"]).column("text").to_pylist()[:150]]
    rng = random.Random(7)
    texts += TORTURE + [random_text(rng, 30) for _ in range(300)]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False).ids == tokenizer.encode(text), repr(text)
    for name in SPECIAL_TOKENS:
        assert hf.token_to_id(name) == tokenizer.encode_special(name)
    ids = tokenizer.encode("round trip through HF")
    assert hf.decode(ids) == "round trip through HF"


def test_round_trip_arbitrary_unicode(tokenizer):
    from test_tokenizer_split import TORTURE, random_text

    rng = random.Random(99)
    texts = TORTURE + [random_text(rng, rng.randrange(0, 80)) for _ in range(500)]
    for text, ids in zip(texts, tokenizer.encode(texts, num_threads=2)):
        assert tokenizer.decode(ids) == text


def test_pickles_for_ray_workers(tokenizer):
    import pickle
    text = "Ray ships the tokenizer to its workers."
    for fresh in (RustBPETokenizer(tokenizer.merges), tokenizer):  # before and after the tiktoken Encoding exists
        clone = pickle.loads(pickle.dumps(fresh))
        assert clone.encode(text) == tokenizer.encode(text)
        assert clone.fingerprint() == tokenizer.fingerprint()
