"""Engine: KV-cache generation equals full recomputation; continuous batching; sampling; the tool."""
import pytest
import torch

from raychat.engine import Engine, ToolUse, TokenEvent, derive_seed, sample_tokens
from raychat.model import GPTConfig, build_model

from modelkit import random_model

VOCAB = 128


@torch.no_grad()
def greedy_by_recomputation(model, prompt, num_tokens):
    """The reference: no cache, the whole sequence goes through the model for every new token."""
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model)


def test_greedy_one_prompt_equals_recomputation(engine, model):
    prompt = [5, 17, 3, 99, 42, 8]
    results, masks = engine.generate_batch(prompt, max_tokens=24, temperature=0.0)
    assert results[0] == greedy_by_recomputation(model, prompt, 24)
    assert masks[0] == [0] * len(prompt) + [1] * 24


def test_greedy_equals_recomputation_with_multithreaded_decode(model):
    """The suite runs single-threaded; with 2 threads decoding takes the model's bmm path (model.Linear)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prompts = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8]]
        results, _ = Engine(model).generate_many(prompts, num_samples=2, max_tokens=16, temperature=0.0)
        assert results == [greedy_by_recomputation(model, p, 16) for p in prompts for _ in range(2)]
    finally:
        torch.set_num_threads(old)


def test_greedy_num_samples_share_prefill_and_equal_recomputation(engine, model):
    prompt = [1, 2, 3, 4]
    expected = greedy_by_recomputation(model, prompt, 16)
    results, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=16, temperature=0.0)
    assert results == [expected] * 3
    columns = list(engine.generate(prompt, num_samples=3, max_tokens=16, temperature=0.0))
    assert len(columns) == 16
    assert [col[0][1] for col in columns] == expected[len(prompt):]
    assert all(mask == [1, 1, 1] for _, mask in columns)


def test_greedy_batch_of_different_prompts_equals_recomputation(engine, model):
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [30, 31, 32], [64, 65, 66, 67, 68]]
    # max_batch_size 2 < 4 prompts: later prompts join while others are mid-generation
    for max_batch_size in (4, 2):
        results, masks = engine.generate_many(prompts, max_tokens=12, temperature=0.0, max_batch_size=max_batch_size)
        for prompt, result, mask in zip(prompts, results, masks):
            assert result == greedy_by_recomputation(model, prompt, 12)
            assert mask == [0] * len(prompt) + [1] * 12


def test_grouped_query_attention_model_decodes_like_recomputation():
    gqa = random_model(depth=4, n_kv_head=1)  # 2 query heads share 1 key/value head
    prompts = [[3, 4, 5], [9, 9, 9, 9, 9, 9, 9]]
    results, _ = Engine(gqa).generate_many(prompts, max_tokens=8, temperature=0.0)
    assert results == [greedy_by_recomputation(gqa, p, 8) for p in prompts]


def test_slot_added_mid_generation_gives_same_tokens_as_alone(engine):
    late_prompt = [9, 8, 7, 6, 5]
    alone, _ = engine.generate_batch(late_prompt, max_tokens=10, temperature=0.0)
    batch = engine.new_batch(max_batch_size=4)
    early = [batch.add([3, 1, 4, 1, 5, 9, 2, 6], max_tokens=30, temperature=0.0),
             batch.add([2, 7], max_tokens=30, temperature=0.0)]
    for _ in range(6):
        batch.step()
    late = batch.add(late_prompt, max_tokens=10, temperature=0.0)
    tokens, finish = [], None
    while batch.num_active:
        for event in batch.step():
            assert isinstance(event, TokenEvent)
            if event.slot == late:
                tokens.append(event.token)
                finish = event.finish_reason if event.finished else finish
    assert late_prompt + tokens == alone[0]
    assert finish == "length" and early == [0, 1] and late == 2


def test_remove_frees_capacity_and_stops_events(engine):
    batch = engine.new_batch(max_batch_size=2)
    a = batch.add([1, 2, 3], temperature=0.0)
    b = batch.add([4, 5], temperature=0.0)
    assert batch.free_slots == 0 and batch.num_active == 2
    with pytest.raises(ValueError, match="batch full"):
        batch.add([6])
    b_tokens = [e.token for e in batch.step() if e.slot == b]
    assert batch.remove(a) is True and batch.remove(a) is False
    assert batch.free_slots == 1
    c = batch.add([6, 7], temperature=0.0)
    events = batch.step()
    assert {e.slot for e in events} == {b, c}
    # b moved to the freed cache row 0: its tokens still match generating alone
    b_tokens += [e.token for e in events if e.slot == b]
    for _ in range(3):
        b_tokens += [e.token for e in batch.step() if e.slot == b]
    alone, _ = engine.generate_batch([4, 5], max_tokens=5, temperature=0.0)
    assert alone[0] == [4, 5] + b_tokens


def test_length_limits_and_bad_requests(engine, model):
    batch = engine.new_batch(max_batch_size=2, max_seq_len=10)
    slot = batch.add([1, 2, 3, 4, 5, 6, 7], temperature=0.0)  # room for 3 tokens
    events = [batch.step() for _ in range(3)]
    assert [e[0].finished for e in events] == [False, False, True]
    assert events[-1][0].finish_reason == "length" and events[-1][0].slot == slot
    assert batch.num_active == 0 and batch.step() == []
    for bad, match in [(dict(prompt_tokens=[]), "empty"), (dict(prompt_tokens=list(range(10))), "no room"),
                       (dict(prompt_tokens=[VOCAB]), "ints in"), (dict(prompt_tokens=[1], top_p=0.0), "top_p"),
                       (dict(prompt_tokens=[1], top_k=0), "top_k"), (dict(prompt_tokens=[1], temperature=-1), "temperature"),
                       (dict(prompt_tokens=[1], temperature=float("nan")), "temperature"),
                       (dict(prompt_tokens=[1], max_tokens=0), "max_tokens")]:
        with pytest.raises(ValueError, match=match):
            batch.add(**bad)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.new_batch(max_seq_len=model.cos.size(0) + 1)


def test_seed_reproduces_sampled_output(engine):
    prompt = [11, 12, 13]
    kwargs = dict(num_samples=3, max_tokens=20, temperature=1.0, top_k=50, top_p=0.9)
    first, masks = engine.generate_batch(prompt, seed=7, **kwargs)
    again, _ = engine.generate_batch(prompt, seed=7, **kwargs)
    other, _ = engine.generate_batch(prompt, seed=8, **kwargs)
    assert first == again and first != other
    assert len({tuple(r) for r in first}) == 3  # rows get different derived seeds
    # a slot's output depends on its seed only, not on what shares the batch
    batch = engine.new_batch(max_batch_size=4)
    batch.add([100, 101], temperature=1.0, seed=1)
    slot = batch.add(prompt, max_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=derive_seed(7, 0))
    tokens, finished = [], False
    while not finished:
        events = [e for e in batch.step() if e.slot == slot]
        tokens += [e.token for e in events]
        finished = events[0].finished
    assert prompt + tokens == first[0]


def test_sample_tokens_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]] * 4)
    uniforms = [i / 200 for i in range(200)]
    def support(**kw):
        n = len(uniforms)
        out = sample_tokens(logits.repeat(n // 4, 1), [kw.get("t", 1.0)] * n, [kw.get("k")] * n,
                            [kw.get("p")] * n, uniforms)
        return set(out)
    assert support(t=0.0) == {1}
    assert support() == {0, 1, 2, 3, 4}
    assert support(k=2) == {1, 2}
    assert support(k=1) == {1}
    # probabilities of the sorted tokens 1,2,3: ~0.64, 0.23, 0.09: top-p 0.8 keeps 1 and 2
    assert support(p=0.8) == {1, 2}
    assert support(p=0.01) == {1}
    assert support(k=3, p=0.99) == {1, 2, 3}
    # inverse CDF: u near 0 picks the first kept token, u near 1 the last
    assert sample_tokens(logits[:1], [1.0], [3], [None], [0.0]) == [1]
    assert sample_tokens(logits[:1], [1.0], [3], [None], [0.9999]) == [3]


def test_top_k_one_equals_greedy(engine):
    greedy, _ = engine.generate_batch([20, 21, 22], max_tokens=10, temperature=0.0)
    sampled, _ = engine.generate_batch([20, 21, 22], max_tokens=10, temperature=0.7, top_k=1, seed=3)
    assert greedy == sampled


# ------------------------------------------------------------------------- stop tokens and the calculator

def _conversation(tokenizer, answer: str):
    """A chat turn in which the assistant calls the calculator, gets `answer` back and ends its turn."""
    special = tokenizer.encode_special
    prompt = [tokenizer.get_bos_token_id(), special("<|user_start|>"), *tokenizer.encode("What is 12+30?"),
              special("<|user_end|>"), special("<|assistant_start|>")]
    reply = [special("<|python_start|>"), *tokenizer.encode("12+30"), special("<|python_end|>"),
             special("<|output_start|>"), *tokenizer.encode(answer), special("<|output_end|>"),
             *tokenizer.encode(" Done."), special("<|assistant_end|>")]
    return prompt, reply


@pytest.fixture(scope="module")
def tool_model(tokenizer):
    """A tiny model that has memorised one tool-using turn whose calculator output is WRONG (41)."""
    from raychat.optim import build_optimizers
    torch.manual_seed(0)
    model = build_model(GPTConfig(depth=2, vocab_size=tokenizer.get_vocab_size(), sequence_len=64))
    prompt, reply = _conversation(tokenizer, "41")
    seq = torch.tensor([prompt + reply])
    adamw, muon = build_optimizers(model, unembedding_lr=0.05, matrix_lr=0.05)
    for _ in range(80):
        model(seq[:, :-1], seq[:, 1:]).backward()
        adamw.step()
        muon.step()
        model.zero_grad(set_to_none=True)
    assert model(seq[:, :-1], seq[:, 1:]).item() < 0.05
    return model.eval()


def test_calculator_output_is_forced_with_mask_zero(tokenizer, tool_model):
    engine = Engine(tool_model, tokenizer)
    prompt, memorised = _conversation(tokenizer, "41")
    _, expected = _conversation(tokenizer, "42")  # what the engine must produce: the real result, forced
    results, masks = engine.generate_batch(prompt, max_tokens=40, temperature=0.0)
    generated, mask = results[0][len(prompt):], masks[0][len(prompt):]
    assert generated == expected[:-1]  # the model carries on after the forced output; terminal excluded
    start = generated.index(tokenizer.encode_special("<|output_start|>"))
    end = generated.index(tokenizer.encode_special("<|output_end|>"))
    assert tokenizer.decode(generated[start + 1:end]) == "42"
    assert mask == [1] * start + [0] * (end - start + 1) + [1] * (len(generated) - end - 1)
    # the Batch API reports the same: forced events, then a stop without a token
    batch = engine.new_batch(max_batch_size=1)
    batch.add(prompt, temperature=0.0)
    events = []
    while batch.num_active:
        events += batch.step()
    assert [e.token for e in events[:-1]] == generated
    assert [e.forced for e in events[:-1]] == [m == 0 for m in mask]
    last = events[-1]
    assert (last.token, last.finished, last.finish_reason) == (None, True, "stop")
    assert last.stop_token == tokenizer.encode_special("<|assistant_end|>")
    # streaming: the terminal token appears in its column, with mask 1
    columns = list(engine.generate(prompt, max_tokens=40, temperature=0.0))
    assert [c[0][0] for c in columns] == expected and [c[1][0] for c in columns] == mask + [1]


def test_tool_state_machine(tokenizer):
    special = tokenizer.encode_special
    tool = ToolUse(tokenizer)
    feed = lambda tokens: [t for token in tokens for t in tool.observe(token)]
    forced = feed([special("<|python_start|>"), *tokenizer.encode("6*7"), special("<|python_end|>")])
    assert forced == [special("<|output_start|>"), *tokenizer.encode("42"), special("<|output_end|>")]
    assert feed([special("<|python_start|>"), *tokenizer.encode("'strawberry'.count('r')"),
                 special("<|python_end|>")])[1:-1] == tokenizer.encode("3")
    # refused or malformed: nothing is forced
    assert feed([special("<|python_start|>"), *tokenizer.encode("__import__('os')"), special("<|python_end|>")]) == []
    assert feed([special("<|python_start|>"), special("<|python_end|>")]) == []
    assert feed([special("<|python_end|>"), *tokenizer.encode("1+1")]) == []
    assert feed([special("<|python_start|>"), *tokenizer.encode("1+" * 300 + "1"), special("<|python_end|>")]) == []


def test_base_model_stops_at_bos(tokenizer, tool_model):
    engine = Engine(tool_model, tokenizer)
    assert engine.stop_tokens == {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}
    assert Engine(tool_model).stop_tokens == set()
