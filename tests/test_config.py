"""Presets load, validate and round-trip; every kind of bad override is one clear line."""
import json

import pytest

from raychat.config import PRESETS, Config, ConfigError, load_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_load_and_round_trip(preset):
    cfg = load_config(preset)
    again = Config.from_dict(json.loads(cfg.to_json()))
    assert again.to_dict() == cfg.to_dict()
    assert cfg.preset == preset


def test_tiers_differ_where_they_should():
    demo, d20, d26, d32 = (load_config(p) for p in ("demo", "d20", "d26", "d32"))
    assert (d20.pretrain.depth, d26.pretrain.depth, d32.pretrain.depth) == (20, 26, 32)
    assert d20.pretrain.total_batch_size == 524_288 and d20.tokenizer.vocab_size == 65536
    assert d20.pretrain.use_gpu and d20.pretrain.num_workers == 8
    assert not demo.pretrain.use_gpu and demo.pretrain.num_workers == 2 and demo.pretrain.dtype == "fp32"
    assert demo.pretrain.depth < d20.pretrain.depth


def test_overrides_are_typed():
    cfg = load_config("d20", ["pretrain.depth=26", "tokenizer.max_chars=2e6", "pretrain.use_gpu=false",
                              "pretrain.matrix_lr=0.03", "data.packing=concat", "run.name=my-run_2"])
    assert cfg.pretrain.depth == 26 and isinstance(cfg.pretrain.depth, int)
    assert cfg.tokenizer.max_chars == 2_000_000
    assert cfg.pretrain.use_gpu is False
    assert cfg.pretrain.matrix_lr == pytest.approx(0.03)
    assert cfg.data.packing == "concat" and cfg.run.name == "my-run_2"
    # later overrides win
    assert load_config("demo", ["pretrain.depth=3", "pretrain.depth=4"]).pretrain.depth == 4


@pytest.mark.parametrize("override, expected", [
    ("nosuch.field=1", "unknown config key 'nosuch.field'"),
    ("pretrain.nosuch=1", "unknown config key 'pretrain.nosuch'"),
    ("pretrain.depth=abc", "pretrain.depth must be an integer, got 'abc'"),
    ("pretrain.depth=2.5", "pretrain.depth must be an integer"),
    ("pretrain.matrix_lr=fast", "pretrain.matrix_lr must be a number"),
    ("pretrain.use_gpu=maybe", "pretrain.use_gpu must be true or false"),
    ("pretrain.depth=0", "pretrain.depth must be >= 1"),
    ("tokenizer.vocab_size=100", "tokenizer.vocab_size must be >= 265"),
    ("serve.port=70000", "serve.port must be <= 65535"),
    ("data.packing=zigzag", "data.packing must be one of bos_bestfit, concat"),
    ("pretrain.zero_stage=3", "pretrain.zero_stage must be one of 1, 2"),
    ("pretrain.depth", "bad override 'pretrain.depth': expected section.field=value"),
    ("pretrain.matrix_lr=nan", "pretrain.matrix_lr must be a finite number"),
    ("run.name=../elsewhere", "run.name must be letters, digits"),
    ("run.storage_path=s3://bucket/x", "object stores like 's3://' are not supported"),
    ("pretrain.sequence_len=4096", "pretrain.sequence_len (4096) must be <= pretrain.max_seq_len (256)"),
])
def test_bad_override_names_the_field(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config("demo", [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'd99'"):
        load_config("d99")


def test_cross_field_check():
    with pytest.raises(ConfigError, match="serve.min_replicas"):
        load_config("demo", ["serve.min_replicas=4", "serve.max_replicas=2"])
