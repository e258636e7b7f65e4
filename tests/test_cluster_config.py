"""The deployment files: cluster.yaml against Ray's own cluster-config schema, the KubeRay RayJob manifest
against the fields KubeRay requires, and jobs/runtime_env.yaml against Ray's own upload filter."""
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _ray_schema() -> dict:
    import ray.autoscaler
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_matches_rays_schema():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(config, _ray_schema())
    # what `ray up` does: fill in the provider's defaults, then Ray's own validation (schema + cross-field checks)
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(config))
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    assert {n["node_config"]["InstanceType"] for n in nodes.values()} == {"p5.48xlarge"}
    assert all(n["resources"]["GPU"] == 8 for n in nodes.values())
    setup = "\n".join(config["setup_commands"])
    assert "rustup" in setup and "pip install" in setup and "tokenizer_rust" in setup
    assert "/mnt/efs" in setup   # the storage every node mounts


def test_schema_check_catches_a_broken_cluster_yaml():
    """The validation above is not vacuous: a wrong type and a missing required key are refused."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    broken = dict(config, max_workers="two")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _ray_schema())
    missing = {k: v for k, v in config.items() if k != "provider"}
    with pytest.raises(jsonschema.ValidationError, match="provider"):
        jsonschema.validate(missing, _ray_schema())


def _get(doc: dict, dotted: str):
    for key in dotted.split("."):
        assert isinstance(doc, dict) and key in doc, f"RayJob lacks {dotted}"
        doc = doc[key]
    return doc


def test_kuberay_rayjob_manifest_has_the_required_fields():
    docs = list(yaml.safe_load_all((REPO / "deploy" / "rayjob.yaml").read_text()))
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert _get(job, "metadata.name")
    assert _get(job, "spec.entrypoint").startswith("python jobs/speedrun.py")
    runtime_env = yaml.safe_load(_get(job, "spec.runtimeEnvYAML"))
    assert runtime_env["env_vars"]["RAYCHAT_BASE_DIR"].startswith("/mnt/shared")
    cluster = _get(job, "spec.rayClusterSpec")
    assert isinstance(_get(cluster, "headGroupSpec.rayStartParams"), dict)
    head = _get(cluster, "headGroupSpec.template.spec.containers")
    assert head and all(c.get("name") and c.get("image") for c in head)
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(c.get("name") and c.get("image") for c in group["template"]["spec"]["containers"])
    # every pod mounts the shared volume where RAYCHAT_BASE_DIR points
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        mounts = [m["mountPath"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert "/mnt/shared" in mounts
