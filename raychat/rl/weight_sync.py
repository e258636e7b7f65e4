"""Shipping each new version of the learner's weights to its rollout actors.

Two ways (`rl.weight_sync`):

* object store: the learner rank puts its state dict into Ray's object store once and every actor
  fetches and loads it. Works everywhere, but every version is serialised into the store and copied out
  again by each actor (on a CPU node, 2 GiB twice for a d20 model).
* broadcast: the learner rank and its actors form a small torch.distributed process group of their own
  (learner = rank 0, actors 1..N), apart from the group Ray Train made for the learners. Each tensor is
  broadcast from the learner's live parameters straight into the actors' parameters: NCCL when both
  sides are on GPUs (device to device, no host copy), gloo over TCP on CPUs.

The group meets through a `FileStore` in the run's checkpoint directory (shared by every node, as the
checkpoints are), so no rendezvous server has to listen on a port. When the group forms, the learner
checks that its actors hold the same tensors (names, shapes, dtypes); if not, it uses the object store.

Failures: a broadcast that fails (an actor died, a connection broke) leaves the group broken; that
version goes through the object store instead (the pool replaces dead actors there), and the next
version forms a new group with the actors then alive. An actor replaced between versions gets the latest
weights through the object store and joins the next group.
"""
from __future__ import annotations

import datetime
import time
import uuid
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from raychat.common import get_logger

log = get_logger("raychat.train")

GROUP_TIMEOUT = datetime.timedelta(minutes=30)   # actors may finish a long rollout before they join a broadcast


def choose_weight_sync(setting: str, use_gpu: bool, placement: str) -> str:
    """`auto`: broadcast, except actors that share a learner's GPU (NCCL cannot put two ranks of one group
    on one device): those use the object store."""
    if setting != "auto":
        return setting
    return "object_store" if use_gpu and placement == "colocated" else "broadcast"


def manifest(model) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype) of every tensor of the state dict, in the order both sides send them."""
    return [(name, tuple(t.shape), str(t.dtype)) for name, t in sorted(model.state_dict().items())]


def cpu_state(model) -> dict:
    """The state dict's tensors on the CPU (copied off a GPU): what the object store ships."""
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}


def make_group(store_path: str, rank: int, world: int, backend: str):
    """A process group of `world` ranks meeting through a file store; blocks until all have joined. Gloo
    listens on this node's Ray address (loopback on a single machine), not on every interface."""
    store = dist.FileStore(store_path, world)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=ray.util.get_node_ip_address())]
    options._timeout = GROUP_TIMEOUT
    return dist.ProcessGroupGloo(store, rank, world, options)


def broadcast_state(group, model) -> None:
    """Broadcast every tensor of `model`'s state dict from rank 0 into the other ranks' tensors, in place,
    in name order (the manifest's). The state dict's tensors share storage with the parameters, so
    receiving into them updates the model."""
    for _, tensor in sorted(model.state_dict().items()):
        group.broadcast(tensor, 0).wait()


class WeightReceiver:
    """The actor side (mixed into RolloutWorker): join a group, receive versions."""

    weight_group = None

    def weight_manifest(self) -> list[tuple[str, tuple, str]]:
        return manifest(self.model)

    def join_weight_group(self, store_path: str, rank: int, world: int, backend: str) -> None:
        self.weight_group = make_group(store_path, rank, world, backend)

    def receive_weights(self, version: int) -> float:
        """Take part in the learner's broadcast of `version`; returns the seconds it took."""
        started = time.perf_counter()
        try:
            with torch.no_grad():
                broadcast_state(self.weight_group, self.model)
        except Exception:
            self.leave_weight_group()   # broken: the learner forms a new group for the next version
            raise
        self.version = version
        return time.perf_counter() - started

    def leave_weight_group(self) -> None:
        if self.weight_group is not None:
            abort(self.weight_group)
        self.weight_group = None


class WeightPublisher:
    """The learner side of one rank: sends each version to that rank's actors (see the module docstring)."""

    def __init__(self, method: str, pool, store_dir: Path, device: str):
        self.method, self.pool, self.store_dir = method, pool, store_dir
        self.backend = "nccl" if str(device).startswith("cuda") else "gloo"
        self.model, self.version = None, 0
        self.group = None
        self.members: list = []      # the actors in the current group
        self.fallbacks = 0           # versions that went through the object store instead of a broadcast
        self.weights_ref = None      # the latest object-store copy (replacement actors start from it)
        pool.on_replace = self._replaced

    def _replaced(self, actor) -> None:
        """A replacement actor: the latest weights through the object store; the group re-forms next time."""
        if self.weights_ref is None:
            self.weights_ref = ray.put(cpu_state(self.model))
        ray.get(actor.set_weights.remote(self.version, self.weights_ref))

    def publish(self, model, version: int) -> dict:
        """Send `version` of `model`'s weights to every actor; statistics of how it went."""
        self.model, self.version = model, version
        started = time.perf_counter()
        sent = self.method == "broadcast" and self._broadcast()
        if not sent:
            self._through_object_store()
        return {"sync_s": time.perf_counter() - started, "sync_fallbacks": self.fallbacks}

    def _through_object_store(self) -> None:
        self.weights_ref = ray.put(cpu_state(self.model))
        self.pool.call_all("set_weights", self.version, self.weights_ref)

    def _form_group(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        store_path = str(self.store_dir / f"group-{uuid.uuid4().hex}")
        actors = list(self.pool.actors)
        world = len(actors) + 1
        if ray.get(actors[0].weight_manifest.remote()) != manifest(self.model):   # a mismatch is for good
            self.method = "object_store"
            raise RuntimeError("the learner's and the actors' weights differ in names, shapes or dtypes; "
                               "using the object store from now on")
        # each actor's join is queued right behind a ping: once every ping is back (each actor finished the
        # rollout it was on) all of them are joining, so the learner does not wait in the rendezvous for an
        # actor that is busy, or dead (a dead actor fails its ping instead)
        pings = [actor.ping.remote() for actor in actors]
        joins = [actor.join_weight_group.remote(store_path, i + 1, world, self.backend)
                 for i, actor in enumerate(actors)]
        ray.get(pings)
        self.group = make_group(store_path, 0, world, self.backend)
        ray.get(joins)
        self.members = actors

    def _broadcast(self) -> bool:
        """True when every actor received this version; False (group dropped) when the object store must."""
        try:
            if self.group is None or self.members != list(self.pool.actors):
                self._drop()
                self._form_group()
            receives = [actor.receive_weights.remote(self.version) for actor in self.members]
            with torch.no_grad():
                broadcast_state(self.group, self.model)
            ray.get(receives)
            self.weights_ref = None   # the object-store copy is out of date now
            return True
        except Exception as error:   # a dead actor, a broken connection: this version goes the other way
            failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        # (outside the except block: its traceback would keep the group alive, and actors inside it waiting)
        self.fallbacks += 1
        log.warning(f"weight broadcast of version {self.version} failed ({failure}); sending it through the object store")
        self._drop()
        return False

    def close(self) -> None:
        """Leave the group (the pool and its actors stay)."""
        self.pool.on_replace = None
        self._drop()

    def _drop(self) -> None:
        """Forget the group on both sides; aborting it ends any actor still waiting inside a broadcast."""
        if self.group is None:
            return
        abort(self.group)
        self.group = None
        for actor in self.members:
            try:
                ray.get(actor.leave_weight_group.remote(), timeout=60)
            except Exception:   # dead, or replaced
                pass
        self.members = []


def abort(group) -> None:
    try:
        group.abort()
    except Exception:   # already broken
        pass
