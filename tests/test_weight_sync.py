"""Weight sync to the rollout actors (raychat/rl/weight_sync.py), through a real gloo process group and the
real object store: after every version the actors hold exactly the learner's weights (checksum), also when
an actor dies between versions or in the middle of a broadcast.
"""
import pytest
import ray
import torch

from raychat.pool import ModelPool
from raychat.rl.rollout import RolloutWorker, weights_checksum
from raychat.rl.weight_sync import WeightPublisher, choose_weight_sync
from serve_helpers import tiny_model


def train_a_little(model, seed: int) -> None:
    """Stands in for an optimizer step: every tensor of the learner changes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.01)


@pytest.fixture
def learner(tokenizer):
    return tiny_model(tokenizer, seed=21)


def start_pool(tokenizer, tmp_path, method, actors=2):
    policy = tiny_model(tokenizer, seed=22)   # the actors start from other weights than the learner's
    pool = ModelPool(RolloutWorker, policy, tokenizer, actors, False, "gsm8k")
    return pool, WeightPublisher(method, pool, tmp_path / "sync", "cpu")


@pytest.mark.parametrize("method", ["broadcast", "object_store"])
def test_every_version_reaches_every_actor(ray_cluster, tokenizer, tmp_path, learner, method):
    pool, publisher = start_pool(tokenizer, tmp_path, method)
    with pool:
        assert pool.call_all("checksum")[0][1] != weights_checksum(learner)
        for version in (1, 2, 3):
            train_a_little(learner, version)
            stats = publisher.publish(learner, version)
            assert pool.call_all("checksum") == [(version, weights_checksum(learner))] * 2
            assert stats["sync_fallbacks"] == 0 and stats["sync_s"] > 0
        assert (publisher.group is not None) == (method == "broadcast")


def test_an_actor_replaced_between_versions_gets_the_latest_and_joins_the_next_group(
        ray_cluster, tokenizer, tmp_path, learner):
    pool, publisher = start_pool(tokenizer, tmp_path, "broadcast")
    with pool:
        train_a_little(learner, 1)
        publisher.publish(learner, 1)
        ray.kill(pool.actors[0])
        assert pool.call_all("checksum") == [(1, weights_checksum(learner))] * 2   # replaced, from the store
        assert pool.restarts == 1
        train_a_little(learner, 2)
        stats = publisher.publish(learner, 2)
        assert stats["sync_fallbacks"] == 0 and publisher.members == pool.actors   # a new group, broadcast
        assert pool.call_all("checksum") == [(2, weights_checksum(learner))] * 2


def test_an_actor_dead_during_a_broadcast_sends_that_version_through_the_store(
        ray_cluster, tokenizer, tmp_path, learner):
    pool, publisher = start_pool(tokenizer, tmp_path, "broadcast", actors=3)
    with pool:
        train_a_little(learner, 1)
        publisher.publish(learner, 1)
        ray.kill(pool.actors[1])   # the pool does not know yet: the broadcast meets a member that is gone
        train_a_little(learner, 2)
        stats = publisher.publish(learner, 2)
        assert stats["sync_fallbacks"] == 1 and pool.restarts == 1 and publisher.group is None
        assert pool.call_all("checksum") == [(2, weights_checksum(learner))] * 3
        train_a_little(learner, 3)
        stats = publisher.publish(learner, 3)   # the next version forms a new group and broadcasts again
        assert stats["sync_fallbacks"] == 1 and publisher.group is not None
        assert pool.call_all("checksum") == [(3, weights_checksum(learner))] * 3


def test_auto_broadcasts_unless_actors_share_the_learners_gpus():
    assert choose_weight_sync("auto", False, "split") == "broadcast"
    assert choose_weight_sync("auto", True, "split") == "broadcast"
    assert choose_weight_sync("auto", True, "colocated") == "object_store"
    assert choose_weight_sync("object_store", True, "split") == "object_store"
