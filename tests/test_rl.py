"""RL (raychat/rl/): rewards, advantages and the loss against hand computations; rollout actors against
the learner (weights, versions, log-probabilities, an actor killed mid-step); and the whole loop on Ray
Train learning a toy task, on-policy and one version stale, with a learner worker killed on the way.
"""
import math
import threading
import time

import pytest
import ray
import torch

from raychat.rl.advantage import group_advantages, micro_batches, sample_rows
from raychat.rl.rewards import count_reward, gsm8k_reward
from raychat.rl.rollout import RolloutWorker, StaleWeights, token_logprobs, weights_checksum
from raychat.rl.tasks import build_rl_task
from raychat.train.step import token_loss_sum
from serve_helpers import save_checkpoint, tiny_model

GSM_ANSWER = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,072"


@pytest.mark.parametrize("completion, reward", [
    ("She sold 1072 clips.\n#### 1072", 1.0),
    ("#### 1,072", 1.0),                       # thousands separators are stripped
    ("so the answer is\n####1072.", 1.0),       # sentence punctuation after the number
    ("#### 1072.0", 1.0),                       # exact numeric comparison
    ("#### 1072\n...\n#### 1072", 1.0),         # repeating the same answer is fine
    ("", 0.0),                                  # an empty answer
    ("####", 0.0),
    ("#### \n", 0.0),
    ("The answer is 1072.", 0.0),               # the number without committing to it
    ("#### 1072 ... no wait #### 1073", 0.0),   # hedging between two answers
    ("#### 1073 #### 1072", 0.0),
    ("#### 11072", 0.0),                        # the number buried in a longer one
    ("#### 1072abc", 0.0),
    ("#### 1072.5", 0.0),
    ("#### 1.072", 0.0),
    ("#### -1072", 0.0),
])
def test_gsm8k_reward(completion, reward):
    assert gsm8k_reward(completion, GSM_ANSWER) == reward


def test_rewards_with_negatives_and_decimals_and_the_spelling_bee():
    assert gsm8k_reward("#### -3", "x #### -3") == 1.0 and gsm8k_reward("#### 3", "x #### -3") == 0.0
    assert gsm8k_reward("#### 2.50", "#### 2.5") == 1.0
    with pytest.raises(ValueError, match="no final"):
        gsm8k_reward("#### 1", "no answer here")
    assert count_reward("a-p-p-l-e ... #### 2", "2") == 1.0 and count_reward("#### 3", "2") == 0.0
    task = build_rl_task("fixed:hello")
    assert task.reward(task.question(0), " hello there") == 1.0 and task.reward(task.question(0), "hi") == 0.0


def test_group_advantages_by_hand():
    assert group_advantages([1, 0, 0, 1]) == [0.5, -0.5, -0.5, 0.5]
    std = 0.5
    a = 0.5 / (std + 1e-4)
    assert group_advantages([1, 0, 0, 1], "grpo") == pytest.approx([a, -a, -a, a])
    assert group_advantages([1, 1, 1]) == [0, 0, 0] == group_advantages([0, 0, 0], "grpo")


def test_rows_carry_the_advantage_on_sampled_tokens_only_and_zero_signal_groups_are_counted():
    # group 1: two replies, rewards 1 and 0 -> advantages +0.5 / -0.5; group 2: both 0 -> no signal
    def sample(ids, mask, reward):
        return {"ids": ids, "mask": mask, "reward": reward, "reply_tokens": sum(mask), "tool_calls": 0}
    samples = [sample([1, 2, 3, 4], [0, 0, 1, 1], 1.0), sample([1, 2, 5], [0, 0, 1], 0.0),
               sample([1, 6, 7], [0, 1, 0], 0.0), sample([1, 8], [0, 1], 0.0)]
    rows, stats = sample_rows(samples, num_samples=2, kind="mean")
    assert rows[0][:3] == ([1, 2, 3], [-1, 3, 4], [0.0, 0.5, 0.5])
    assert rows[1][:3] == ([1, 2], [-1, 5], [0.0, -0.5])
    assert rows[2][:3] == ([1, 6], [6, -1], [0.0, 0.0])   # a forced token (mask 0) is not a target
    assert stats["zero_signal_groups"] == 1 and stats["groups"] == 2 and stats["reward"] == 0.25
    [batch] = micro_batches(rows, rows_per_batch=4)
    assert batch.inputs.shape == (4, 3) and batch.targets[1].tolist() == [-1, 5, -1]
    assert batch.weights[1].tolist() == [0.0, -0.5, 0.0]


def test_the_policy_gradient_loss_is_the_advantage_weighted_mean_of_minus_log_p(tokenizer):
    model = tiny_model(tokenizer)
    samples = [{"ids": [5, 6, 7, 8], "mask": [0, 1, 1, 1], "reward": 1.0, "reply_tokens": 3, "tool_calls": 0},
               {"ids": [5, 9, 10], "mask": [0, 1, 1], "reward": 0.0, "reply_tokens": 2, "tool_calls": 0}]
    rows, _ = sample_rows(samples, num_samples=2, kind="mean")
    [batch] = micro_batches(rows, rows_per_batch=2)
    loss = token_loss_sum(model, batch) / int((batch.targets >= 0).sum())
    logp = token_logprobs(model, [s["ids"] for s in samples], "cpu")
    by_hand = -(0.5 * sum(logp[0]) - 0.5 * sum(logp[1])) / 5
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-5)


def test_dr_grpo_keeps_the_mean_baseline_and_divides_by_replies_times_the_token_budget(tokenizer):
    from raychat.config import load_config
    from raychat.rl.stage import RLStage
    assert group_advantages([1, 0, 0, 1], "drgrpo") == [0.5, -0.5, -0.5, 0.5]
    stage = RLStage(load_config("demo", ["rl.advantage=drgrpo", "rl.max_new_tokens=10"]))
    samples = [{"ids": [5, 6, 7, 8], "mask": [0, 1, 1, 1], "reward": 1.0, "reply_tokens": 3, "tool_calls": 0},
               {"ids": [5, 9, 10], "mask": [0, 1, 1], "reward": 0.0, "reply_tokens": 2, "tool_calls": 0}]
    rows, _ = sample_rows(samples, num_samples=2, kind="drgrpo")
    batches = micro_batches(rows, rows_per_batch=1)
    assert stage.loss_normalizer(batches) == 2 * 10   # 2 replies of at most 10 tokens, however long they are
    assert RLStage(load_config("demo")).loss_normalizer(batches) == 5   # mean: the 5 sampled tokens


# ------------------------------------------------------------------------------- actors and the learner

@pytest.fixture(scope="module")
def policy(tokenizer):
    return tiny_model(tokenizer, seed=5)


def chunk(tokenizer, indices, min_version=0, num_samples=3, max_tokens=6, seed=11):
    task = build_rl_task("gsm8k", "test")
    return {"questions": [{"index": i, "prompt": tokenizer.render_for_completion(task.question(i)),
                           "conversation": task.question(i)} for i in indices],
            "num_samples": num_samples, "max_tokens": max_tokens, "temperature": 1.0, "top_k": 50, "seed": seed,
            "min_version": min_version}


def test_actor_weights_versions_and_log_probs_agree_with_the_learner(ray_cluster, tokenizer, policy):
    from raychat.pool import ModelPool
    learner = tiny_model(tokenizer, seed=6)   # other weights than the actors start with
    with ModelPool(RolloutWorker, policy, tokenizer, 2, False, "gsm8k") as pool:
        assert weights_checksum(learner) != ray.get(pool.actors[0].checksum.remote())[1]
        state = ray.put({k: v.clone() for k, v in learner.state_dict().items()})
        pool.call_all("set_weights", 1, state)
        assert pool.call_all("checksum") == [(1, weights_checksum(learner))] * 2
        with pytest.raises(StaleWeights, match="version 1, the learner needs >= 2"):
            ray.get(pool.actors[0].rollout.remote(chunk(tokenizer, [0], min_version=2)))
        [result] = pool.map("rollout", [chunk(tokenizer, [0, 1])])
    assert result["version"] == 1 and len(result["samples"]) == 6
    sequences = [s["ids"] for s in result["samples"]]
    mine = token_logprobs(learner.eval(), sequences, "cpu")
    gaps = [abs(a - b) for s, lp in zip(result["samples"], mine) for a, b in zip(s["logprobs"], lp)]
    assert max(gaps) < 1e-5
    for s in result["samples"]:
        prompt = len(chunk(tokenizer, [s["question"]])["questions"][0]["prompt"])
        assert s["mask"][:prompt] == [0] * prompt and sum(s["mask"]) == s["reply_tokens"] > 0


def test_a_killed_actor_is_replaced_with_the_latest_weights_and_every_question_is_answered_once(
        ray_cluster, tokenizer, policy):
    from raychat.pool import ModelPool
    questions = list(range(16))
    chunks = [chunk(tokenizer, [i], min_version=3, max_tokens=48) for i in questions]
    state = ray.put({k: v.clone() for k, v in policy.state_dict().items()})
    with ModelPool(RolloutWorker, policy, tokenizer, 2, False, "gsm8k") as pool:
        pool.call_all("set_weights", 3, state)
        clock = time.monotonic()
        expected = pool.map("rollout", chunks)
        kill_after = (time.monotonic() - clock) / 3   # in the first third of the work: the victim is busy
        # a replacement starts from the original weights (version 0): without the hook its chunks would be
        # refused as stale
        pool.on_replace = lambda actor: actor.set_weights.remote(3, state)
        victim = pool.actors[1]
        killer = threading.Timer(kill_after, lambda: ray.kill(victim))
        started = time.monotonic()
        killer.start()
        got = pool.map("rollout", chunks)
        killer.join()
        assert time.monotonic() - started > kill_after, "the work ended before the actor was killed: nothing was tested"
        assert pool.restarts == 1
    assert [r["samples"][0]["question"] for r in got] == questions
    assert [[s["ids"] for s in r["samples"]] for r in got] == [[s["ids"] for s in r["samples"]] for r in expected]


# ------------------------------------------------------------------------------------ the whole loop

def first_token_chance(model, tokenizer, word: str) -> float:
    """The chance that a reply to the toy question starts with `word` (top-50 sampling at temperature 1)."""
    prompt = tokenizer.render_for_completion(build_rl_task(f"fixed:{word}").question(0))
    with torch.no_grad():
        top = torch.topk(model(torch.tensor([prompt]), last_only=True)[0, -1], 50)
    probs = torch.softmax(top.values, -1)
    texts = [tokenizer.decode([int(i)]) for i in top.indices]
    return sum(float(p) for p, t in zip(probs, texts) if t.strip() and t.lstrip().startswith(word))


def toy_word(model, tokenizer) -> str:
    """A word the untrained model starts its reply with now and then (2-5 of 64 sampled replies, drawn by
    a rollout worker as the RL run will): learnable, and far from learnt (a first step's 32 replies reach
    the test's 0.2 by chance in ~2 % of draws at 5/64)."""
    words = sorted({tokenizer.decode([i]).strip() for i in range(256, tokenizer.get_vocab_size())
                    if tokenizer.decode([i]).strip().isalpha() and len(tokenizer.decode([i]).strip()) >= 3})
    chances = sorted(((first_token_chance(model, tokenizer, w), w) for w in words), reverse=True)
    for chance, word in [(c, w) for c, w in chances if 0.02 <= c <= 0.12][:10]:
        worker = RolloutWorker(model, tokenizer, False, f"fixed:{word}")
        task = build_rl_task(f"fixed:{word}")
        question = {"index": 0, "prompt": tokenizer.render_for_completion(task.question(0)),
                    "conversation": task.question(0)}
        result = worker.rollout({"questions": [question], "num_samples": 64, "max_tokens": 3, "temperature": 1.0,
                                 "top_k": 50, "seed": 99, "min_version": 0})
        if 2 <= sum(s["reward"] for s in result["samples"]) <= 5:
            return word
    raise AssertionError("no word that 2-5 of 64 replies start with")


def rewards_logged(base, run: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(base / "tb" / "rl" / run))
    events.Reload()
    by_step = {e.step: e.value for e in events.Scalars("rl/reward")}
    return [by_step[step] for step in sorted(by_step)]


@pytest.mark.parametrize("staleness", [0, 1], ids=["on-policy", "stale-ppo-killed"])
def test_rl_learns_a_toy_task_on_ray_train(ray_cluster, tokenizer, tmp_path, monkeypatch, staleness):
    from raychat.config import load_config
    from raychat.train.launch import train_main
    from types import SimpleNamespace
    base = save_checkpoint(tokenizer, tmp_path / "base")
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(base))
    from raychat.checkpoint import load_model
    parent, _ = load_model(base / "checkpoints" / "sft" / "default" / "step_000000")
    word = toy_word(parent.eval(), tokenizer)   # the very weights RL starts from
    steps = 16
    overrides = [f"rl.task=fixed:{word}", "rl.num_samples=16", "rl.examples_per_step=2", "rl.device_batch_size=16",
                 "rl.max_new_tokens=3", f"rl.num_iterations={steps}", "rl.init_lr_frac=1.0", "rl.eval_problems=1",
                 "rl.eval_samples=4", "rl.save_every=4", f"rl.max_staleness={staleness}", f"run.name=toy{staleness}",
                 "rl.parent_run=default"]
    if staleness == 1:  # with PPO (2 updates per batch); a learner worker dies at step 6 and the run resumes
        # from step 4's checkpoint
        overrides += ["run.kill_worker_at_step=6", "rl.max_failures=1", "rl.ppo_epochs=2"]
    else:
        overrides += ["rl.max_failures=0"]
    cfg = load_config("demo", overrides)
    assert train_main(cfg, SimpleNamespace(subcommand="rl")) == 0
    rewards = rewards_logged(base, f"toy{staleness}")
    assert len(rewards) == steps
    assert rewards[0] < 0.2, rewards
    assert sum(rewards[-3:]) / 3 > 0.8, rewards
    report = (base / "report" / "rl_train.json").read_text()
    assert '"pass@1"' in report
    if staleness == 1:
        assert (base / "checkpoints" / "rl" / "toy1" / ".fault_injected").exists()


# ------------------------------------------------------------------------------- PPO clipping and KL

def ppo_batch(tokenizer, model, shift_old=0.0, shift_ref=None):
    """Two replies with advantages +0.5 / -0.5; old (and reference) log-probs = the model's own + shift."""
    samples = [{"ids": [5, 6, 7, 8], "mask": [0, 1, 1, 1], "reward": 1.0, "reply_tokens": 3, "tool_calls": 0},
               {"ids": [5, 9, 10], "mask": [0, 1, 1], "reward": 0.0, "reply_tokens": 2, "tool_calls": 0}]
    logp = token_logprobs(model, [s["ids"] for s in samples], "cpu")
    for s, lp in zip(samples, logp):
        s["logprobs"] = [x + shift_old for x in lp]
        if shift_ref is not None:
            s["ref_logprobs"] = [x + shift_ref for x in lp]
    rows, _ = sample_rows(samples, num_samples=2, kind="mean")
    [batch] = micro_batches(rows, rows_per_batch=2)
    return batch, logp


def gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_the_clipped_loss_at_ratio_one_has_the_policy_gradient(tokenizer):
    from raychat.rl.loss import policy_loss
    model = tiny_model(tokenizer).train()
    batch, _ = ppo_batch(tokenizer, model.eval())
    model.train()
    reinforce = gradients(model, token_loss_sum(model, batch))
    clipped = gradients(model, policy_loss(0.2, 0.0)(model, batch))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(reinforce, clipped))


def test_the_clipped_loss_and_the_kl_penalty_by_hand(tokenizer):
    from raychat.rl.loss import policy_loss
    model = tiny_model(tokenizer).eval()
    # old log-probs log(2) below the current ones: ratio 2 everywhere, clipped to 1.2 where A > 0 (the min
    # of 2A and 1.2A), kept at 2 where A < 0 (min of -1 and -0.6)
    batch, logp = ppo_batch(tokenizer, model, shift_old=-math.log(2))
    with torch.no_grad():
        loss = float(policy_loss(0.2, 0.0)(model, batch))
    assert loss == pytest.approx(-(3 * 1.2 * 0.5 + 2 * 2 * -0.5), rel=1e-5)
    # reference 0.5 above the policy on every sampled token: k3 = e^0.5 - 0.5 - 1 per token, 5 tokens
    batch, _ = ppo_batch(tokenizer, model, shift_old=0.0, shift_ref=0.5)
    with torch.no_grad():
        with_kl = float(policy_loss(0.2, 0.1)(model, batch))
        without = float(policy_loss(0.2, 0.0)(model, batch))
    assert with_kl - without == pytest.approx(0.1 * 5 * (math.exp(0.5) - 0.5 - 1), rel=1e-5)


def test_placement_needs_enough_gpus_and_says_so_before_anything_starts(ray_cluster):
    from raychat.common import UserError
    from raychat.config import load_config
    from raychat.rl.stage import RLStage
    split = RLStage(load_config("d20", []))           # 8 learners + 8 actors, one GPU each
    with pytest.raises(UserError, match="rl.placement=split with 8 learners and 8 rollout actors needs 16 GPUs; "
                                        "the cluster has 0"):
        split.check_placement()
    colocated = RLStage(load_config("d20", ["rl.placement=colocated"]))
    with pytest.raises(UserError, match="needs 8 GPUs"):
        colocated.check_placement()
    assert (split.actor_gpus(), split.learner_gpus()) == (1.0, 1.0)
    assert (colocated.actor_gpus(), colocated.learner_gpus()) == (0.5, 0.5)
    RLStage(load_config("demo", [])).check_placement()   # CPU: nothing to check


def test_a_wrong_rl_task_is_refused_by_the_config():
    from raychat.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="rl.task must be gsm8k, spelling-bee or fixed:<word>, got 'nope'"):
        load_config("demo", ["rl.task=nope"])
    assert load_config("demo", ["rl.task=fixed:hi"]).rl.task == "fixed:hi"
