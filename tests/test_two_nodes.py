"""A real two-node Ray cluster on 127.0.0.1: `ray start --head` and a second `ray start --address=...`, each
with its own temp dir, ports and one unit of a custom resource. The pretraining stage is submitted with
`ray job submit` exactly as on a cluster (working dir + jobs/runtime_env.yaml); each of its two workers asks
for that resource, so they land on different nodes. The first submission loses a worker (no retries) after
its step-2 checkpoint and fails; submitting again continues from that checkpoint to the end.

Ray 2.60 turns token authentication on for `ray start` clusters: both nodes and every client get the same
token through RAY_AUTH_MODE=token / RAY_AUTH_TOKEN (never ~/.ray/auth_token). `ray stop` would stop every
Ray on this machine (other users' too), so the cluster is stopped by process: every process it started
carries a marker in its environment.
"""
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESOURCE = "raychat_test_slot"
STAGE_ARGS = ["--preset", "demo", "--set", f"pretrain.resources_per_worker={RESOURCE}=1",
              "--set", "pretrain.sequence_len=64", "--set", "pretrain.max_seq_len=64",
              "--set", "pretrain.device_batch_size=4", "--set", "pretrain.total_batch_size=512",
              "--set", "pretrain.num_iterations=4", "--set", "pretrain.save_every=2", "--set", "pretrain.eval_every=0",
              "--set", "pretrain.eval_tokens=512", "--set", "pretrain.log_every=1", "--set", "data.ray_data=false",
              "--set", "run.kill_worker_at_step=3", "--set", "pretrain.max_failures=0"]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_ports(head: bool) -> list[str]:
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port"]
    if head:
        names += ["port", "dashboard-port", "ray-client-server-port"]
    return [f"--{name}={port}" for name, port in zip(names, free_ports(len(names)))]


def ray_cli(args: list[str], env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"ray {' '.join(args[:2])} failed:\n{(done.stdout + done.stderr)[-3000:]}"
    return done


def marked_processes(marker: str) -> list:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("RAYCHAT_TEST_CLUSTER") == marker:
                found.append(process)
        except (psutil.Error, OSError):
            pass
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def safe_connections(process) -> list:
    try:
        return process.net_connections(kind="inet")
    except (psutil.Error, OSError):
        return []


def stop_marked(marker: str) -> None:
    """SIGTERM, then SIGKILL, every process whose environment carries this cluster's marker."""
    def marked():
        return marked_processes(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in marked():
            try:
                process.send_signal(sig)
            except psutil.Error:
                pass
        psutil.wait_procs(marked(), timeout=15)


@pytest.fixture(scope="module")
def cluster(tokenizer, data_dir):
    # short paths: Ray's unix sockets live under the temp dir (107-byte limit)
    root = Path(tempfile.mkdtemp(prefix="rc2n-", dir="/tmp"))
    marker = uuid.uuid4().hex
    base = root / "base"
    tokenizer.save(base / "tokenizer")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({"PATH": f"{BIN}:{env.get('PATH', '')}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex, "RAYCHAT_TEST_CLUSTER": marker,
                "RAYCHAT_DATA_DIR": str(data_dir), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    head_ports = node_ports(head=True)
    gcs = next(p.split("=")[1] for p in head_ports if p.startswith("--port="))
    dashboard = next(p.split("=")[1] for p in head_ports if p.startswith("--dashboard-port="))
    resources = json.dumps({RESOURCE: 1})
    try:
        ray_cli(["start", "--head", "--num-cpus=2", f"--resources={resources}", "--dashboard-host=127.0.0.1",
                 f"--temp-dir={root / 'head'}", "--disable-usage-stats", *head_ports], env)
        # The switch that keeps the head on 127.0.0.1 also forbids joining it, and with the switch on `ray start`
        # rewrites 127.0.0.1 (the head's address and the node's own) to the machine's external address. So the
        # second node is `ray start` with the switch on and that one rewrite turned off: both nodes, and every
        # listener they open (checked below), stay on loopback.
        joiner = ["-c", "import sys; import ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
                        "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]
        done = subprocess.run([sys.executable, *joiner, "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
                               "--num-cpus=2", f"--resources={resources}", f"--temp-dir={root / 'node2'}",
                               "--disable-usage-stats", *node_ports(head=False)],
                              env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
        runtime_env["env_vars"].update({"RAYCHAT_BASE_DIR": str(base), "RAYCHAT_DATA_DIR": str(data_dir),
                                        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
        (root / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
        yield {"root": root, "base": base, "env": env, "address": f"http://127.0.0.1:{dashboard}",
               "marker": marker}
    finally:
        stop_marked(marker)


def submit(cluster) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--working-dir", str(REPO),
                           "--runtime-env", str(cluster["root"] / "runtime_env.yaml"), "--",
                           "python", "jobs/base.py", *STAGE_ARGS],
                          env=cluster["env"], capture_output=True, text=True, timeout=600)


def test_two_nodes_job_fails_then_resubmission_continues(cluster):
    nodes = ray_cli(["list", "nodes", "--address", cluster["address"], "--format", "json"], cluster["env"])
    alive = [n for n in json.loads(nodes.stdout) if n["state"] == "ALIVE"]
    assert len(alive) == 2 and {n["node_ip"] for n in alive} == {"127.0.0.1"}
    listening = {c.laddr.ip for p in marked_processes(cluster["marker"]) for c in safe_connections(p)
                 if c.status == psutil.CONN_LISTEN}
    assert listening and all(is_loopback(ip) for ip in listening), listening

    started = time.time()
    first = submit(cluster)
    assert first.returncode != 0, first.stdout[-3000:]
    root = cluster["base"] / "checkpoints" / "base" / "default"
    assert (root / "step_000002").is_dir() and not (root / "step_000004").exists(), (first.stdout + first.stderr)[-4000:]

    second = submit(cluster)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    log = second.stdout
    assert "resumed from" in log and "step_000002 at step 2" in log
    assert f"base: outputs in\n  {root}" in log
    meta = json.loads((root / "step_000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["world_size"] == 2

    actors = ray_cli(["list", "actors", "--address", cluster["address"], "--detail", "--format", "json",
                      "--limit", "1000", "--filter", "class_name=RayTrainWorker"], cluster["env"])
    workers = json.loads(actors.stdout)
    assert len(workers) >= 2
    # every worker group of both jobs: its two workers on the two different nodes
    assert {w["node_id"] for w in workers} == {n["node_id"] for n in alive}
    print(f"two jobs on two nodes in {time.time() - started:.0f} s")
