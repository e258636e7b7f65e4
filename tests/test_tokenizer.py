"""RustBPETokenizer: encoding, special tokens, storage, fingerprint (fast; uses the session `tokenizer`)."""
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
