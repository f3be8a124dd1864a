"""cluster/: the launcher YAMLs validate against Ray's own config schema, the KubeRay manifests parse,
carry the fields KubeRay requires, and their pod templates validate against Kubernetes' schema; the
settings live in one place and agree everywhere."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
K8S_VERSION = "1.30"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def env_sh() -> dict[str, str]:
    """The defaults cluster/jasper-env.sh exports."""
    out = {}
    for line in (CLUSTER / "jasper-env.sh").read_text().splitlines():
        m = re.match(r"export (\w+)=(.*)", line.strip())
        if m:
            value = m.group(2)
            default = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
            out[m.group(1)] = shlex.split(default.group(1) if default else value)[0]
    return out


@pytest.mark.parametrize("name", ["local.yaml", "aws.yaml"])
def test_launcher_configs_validate_against_rays_schema(name: str) -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load(name)
    jsonschema.validate(config, schema)
    commands = " ".join(
        config["setup_commands"] + config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    )
    assert "cluster/requirements.txt" in commands and "jasper-env.sh" in commands
    assert "/mnt/jasper" in commands, "every node mounts the shared dataset volume"
    assert config["file_mounts"] == {"~/jasper_ray": "."}


def test_a_schema_violation_is_caught() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load("local.yaml")
    config["min_wrokers"] = 2
    with pytest.raises(jsonschema.ValidationError, match="min_wrokers"):
        jsonschema.validate(config, schema)


def test_local_config_passes_rays_own_preparation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load("local.yaml")))


def test_pinned_requirements_match_what_is_installed() -> None:
    from importlib.metadata import version

    pins = dict(
        re.match(r"([\w\-]+)(?:\[[^\]]*\])?==(\S+)", line).groups()
        for line in (CLUSTER / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(pins) == {"torch", "ray", "h5py", "numpy", "pyarrow", "tqdm"}
    for package, pinned in pins.items():
        assert version(package).split("+")[0] == pinned, (
            f"{package}: tests run {version(package)}, cluster pins {pinned}"
        )


def _pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [spec["submitterPodTemplate"]]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-convert.yaml", "rayjob-train.yaml"])
def test_kuberay_manifests(name: str) -> None:
    doc = load(f"kuberay/{name}")
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    if doc["kind"] == "RayCluster":
        spec = doc["spec"]
        assert spec["rayVersion"] == ray.__version__
        assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict)
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            assert isinstance(group["rayStartParams"], dict)
    else:
        assert doc["kind"] == "RayJob"
        assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": load("kuberay/raycluster.yaml")["metadata"]["name"]}
        entry = doc["spec"]["entrypoint"]
        assert entry.startswith(("jasper-ray convert", "python /home/ray/jasper_ray/scripts/train_ray.py"))
        if "train_ray.py" in entry:
            assert (ROOT / "scripts" / "train_ray.py").is_file()
    for template in _pod_templates(doc):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        for container in template["spec"]["containers"]:
            assert container["image"] == "jasper-ray:0.1.0", "the image cluster/Dockerfile builds"
            assert {"configMapRef": {"name": "jasper-env"}} in container["envFrom"]


@pytest.mark.parametrize("name", ["jasper-env.yaml", "pvc.yaml"])
def test_core_objects_validate(name: str) -> None:
    kubernetes_validate.validate(load(f"kuberay/{name}"), K8S_VERSION, strict=True)


def test_settings_agree_everywhere() -> None:
    env = env_sh()
    assert env["HDF5_USE_FILE_LOCKING"] == "FALSE"
    configmap = load("kuberay/jasper-env.yaml")["data"]
    assert configmap == {k: env[k] for k in configmap}, "jasper-env.yaml and jasper-env.sh disagree"
    cluster = load("kuberay/raycluster.yaml")["spec"]
    for params in [cluster["headGroupSpec"]["rayStartParams"]] + [
        g["rayStartParams"] for g in cluster["workerGroupSpecs"]
    ]:
        assert params["object-store-memory"] == env["JASPER_OBJECT_STORE_BYTES"]
        assert params["object-spilling-directory"] == env["JASPER_SPILL_DIR"]


def test_dockerfile_builds_from_rays_image_of_the_pinned_version() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-cpu" in text
    assert "cluster/requirements.txt" in text
