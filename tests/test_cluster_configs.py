"""The cluster configs in configs/cluster/ parse, have CPU + GPU workers and name existing configs."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from laionbuild.cli import build_parser
from laionbuild.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "configs" / "cluster"
AWS = CLUSTER / "aws.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
RAY_VERSION = "2.60.0"
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
_CONFIG_REF = re.compile(r"(?<![\w./-])(configs/[\w-][\w./-]*\.ya?ml)\b")


def _aws() -> dict:
    return yaml.safe_load(AWS.read_text(encoding="utf-8"))


def _rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text(encoding="utf-8")) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0]


def _run_args(command: str) -> list[str]:
    """The ``laionbuild run ...`` arguments of a shell command line."""
    words = shlex.split(command)
    i = next(j for j in range(len(words) - 1) if words[j] == "laionbuild" and words[j + 1] == "run")
    end = next((j for j in range(i, len(words)) if words[j] in ("&&", ";", "|")), len(words))
    return words[i + 2:end]


def test_aws_cluster_config():
    cfg = _aws()
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    head = types[cfg["head_node_type"]]
    gpu = [t for name, t in types.items() if "GPU" in (t.get("resources") or {}) and t["resources"]["GPU"] > 0]
    cpu = [t for name, t in types.items()
           if name != cfg["head_node_type"] and not (t.get("resources") or {}).get("GPU")]
    assert len(gpu) == 1 and len(cpu) == 1
    assert re.match(r"(g5|g6|p4d|p5)\.", gpu[0]["node_config"]["InstanceType"])
    assert re.match(r"(c|m)\d", cpu[0]["node_config"]["InstanceType"])
    # GPUs present when the run starts, within the global worker limit
    assert gpu[0]["min_workers"] >= 1
    assert cpu[0]["max_workers"] + gpu[0]["max_workers"] <= cfg["max_workers"]
    # no stage work on the head
    assert head["resources"].get("CPU") == 0
    assert any("--num-cpus=0" in c for c in cfg["head_start_ray_commands"])
    # every node installs the package with the extras the stages need
    for commands in (cfg["setup_commands"], gpu[0]["worker_setup_commands"]):
        assert any(re.search(r"laionbuild\[cluster\]", c) for c in commands)
        assert any(f"ray[default,data]=={RAY_VERSION}" in c for c in commands)
    assert "~/laionbuild" in cfg["file_mounts"]
    # every node boots a current, named image (not Ray's Ubuntu 18.04 default)
    for name, node_type in types.items():
        assert node_type["node_config"]["ImageId"] == f"resolve:ssm:{DLAMI_PARAMETER}", name
    # the head launches the workers with its own role; workers get the node role
    assert head["node_config"]["IamInstanceProfile"]["Name"] == "laionbuild-ray-head"
    assert {t["node_config"]["IamInstanceProfile"]["Name"] for n, t in types.items() if t is not head} == {
        "laionbuild-ray-node"}
    # a node-local caching resolver on every node
    init = " ".join(cfg["initialization_commands"])
    assert "apt-get install -y -q unbound" in init and "DNS=127.0.0.1" in init


def test_cluster_extra_installs_what_the_configs_need():
    """The ``cluster`` extra (setup commands, Dockerfile) holds every optional engine the configs name."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cluster = " ".join(extras["cluster"])
    for extra in ("ray", "clip", "fetch", "fastwarc", "multilingual"):
        assert extra in cluster.split("[", 1)[1].split("]", 1)[0].split(",")
    for package in ("s3fs", "sentence-transformers", "cld3-py"):
        assert package in cluster
    assert any(p.startswith("transformers") for p in extras["multilingual"])
    docker = (CLUSTER / "Dockerfile").read_text()
    assert '-e ".[cluster]"' in docker and "RAY_VERSION=" + RAY_VERSION in docker
    # the base image is Ray's image of the Ray version in use
    assert re.search(r"^ARG BASE_IMAGE=rayproject/ray:\$\{RAY_VERSION\}-py31[0-9]-gpu$", docker, re.M)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored


KEY_PACKAGES = ("ray", "torch", "torchvision", "open-clip-torch", "pyarrow")


def test_constraints_pin_the_tested_environment():
    """configs/cluster/constraints.txt pins what this environment runs (scripts/lock_constraints.py)."""
    import importlib.metadata as md
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock_constraints", REPO / "scripts" / "lock_constraints.py")
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    pins = lock.read_pins(CLUSTER / "constraints.txt")
    assert pins["ray"] == RAY_VERSION
    for package in KEY_PACKAGES:
        assert pins[package] == md.version(package), f"{package}: run scripts/lock_constraints.py"
    assert "laionbuild" not in pins
    # the file is what the script writes: rendering its own pins gives the file back
    assert lock.render(pins) == (CLUSTER / "constraints.txt").read_text(encoding="utf-8")


def test_every_install_goes_through_the_constraints():
    """The Makefile, every setup command of the launcher and the Dockerfile install through the file."""
    aws = _aws()
    commands = [*aws["setup_commands"], *aws["head_setup_commands"]]
    for node_type in aws["available_node_types"].values():
        commands += node_type.get("worker_setup_commands", [])
    installs = [c for c in commands if "pip install" in c and " -U pip" not in c]
    # the nodes' Python 3.11 environment (the AMI's Python is older than the pins allow)
    assert all(c.startswith("~/lbenv/bin/python -m pip") for c in installs), installs
    starts = [*aws["head_start_ray_commands"], *aws["worker_start_ray_commands"]]
    assert all("~/lbenv/bin/ray" in c for c in starts if "ray " in c), starts
    docker = (CLUSTER / "Dockerfile").read_text()
    installs += [line for line in docker.splitlines() if "pip install" in line]
    make = (REPO / "Makefile").read_text()
    installs += [line for line in make.splitlines() if "pip install" in line]
    assert len(installs) >= 7
    for command in installs:
        assert "-c " in command and "constraints" in command or "-c $(CONSTRAINTS)" in command, command
    assert "CONSTRAINTS := configs/cluster/constraints.txt" in make


def test_aws_config_matches_ray_schema():
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    # the launcher fills in the provider defaults before it validates
    util.validate_config(util.prepare_config(_aws()))


def test_aws_config_matches_the_schema_file_of_the_ray_wheel():
    """The raw file (before the launcher fills in defaults) against ray/autoscaler/ray-schema.json."""
    jsonschema = pytest.importorskip("jsonschema")
    ray = pytest.importorskip("ray")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(_aws(), schema)
    bad = {**_aws(), "setup_comands": []}            # a misspelt key is refused
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_ray_versions_agree():
    """Launcher, RayJob and Dockerfile install the same Ray as the package's environment."""
    job = _rayjob()
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == RAY_VERSION
    ray = pytest.importorskip("ray")
    assert ray.__version__ == RAY_VERSION, "update RAY_VERSION in configs/cluster/ and this test"


def test_kuberay_service_account():
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text(encoding="utf-8")) if d]
    accounts = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ServiceAccount"}
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        assert template["spec"]["serviceAccountName"] in accounts
    for account in accounts.values():
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_kuberay_rayjob():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}

    def gpus(group) -> int:
        total = 0
        for c in group["template"]["spec"]["containers"]:
            limits = c.get("resources", {}).get("limits", {})
            total += int(limits.get("nvidia.com/gpu", 0))
        return total

    gpu_groups = [g for g in groups.values() if gpus(g) > 0]
    cpu_groups = [g for g in groups.values() if gpus(g) == 0]
    assert len(gpu_groups) == 1 and len(cpu_groups) == 1
    g = gpu_groups[0]
    assert g["minReplicas"] >= 1 and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for group in groups.values():
        for c in group["template"]["spec"]["containers"]:
            assert c["resources"]["requests"] == c["resources"]["limits"]
    # one CLIP actor per GPU in the cluster
    args = _run_args(spec["entrypoint"])
    sets = dict(a.split("=", 1) for a in args[args.index("--set") + 1::2] if "=" in a)
    assert int(sets["clip.actors"]) == g["replicas"] * gpus(g)


@pytest.mark.parametrize("path", [AWS, RAYJOB, CLUSTER / "Dockerfile", REPO / "docs" / "cluster.md"])
def test_referenced_configs_exist(path):
    text = path.read_text(encoding="utf-8")
    refs = set(_CONFIG_REF.findall(text))
    if path in (AWS, RAYJOB):
        assert "configs/laion5b.yaml" in refs
    missing = sorted(r for r in refs if not (REPO / r).is_file())
    assert not missing, f"{path.name} names missing files: {missing}"


def test_entrypoints_parse_with_the_cli():
    """The ``laionbuild run`` command lines in the manifest and the docs are valid CLI calls."""
    commands = [_rayjob()["spec"]["entrypoint"]]
    doc = (REPO / "docs" / "cluster.md").read_text(encoding="utf-8")
    for block in re.findall(r"```(?:bash)?\n(.*?)```", doc, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            if "laionbuild run" in line:
                commands.append(line.strip().strip("'"))
    assert len(commands) >= 3
    parser = build_parser()
    for command in commands:
        args = _run_args(command.replace("'", ""))
        if "..." in args:
            continue
        ns = parser.parse_args(["run", *args])
        assert ns.config == "configs/laion5b.yaml"
        assert ns.output.startswith("s3://") and ns.input and ns.input[0].startswith("s3://")
        if (REPO / ns.config).is_file():
            cfg = load_config(REPO / ns.config, ns.overrides)
            assert cfg.clip.device == "cuda" and cfg.clip.actors >= 1
            assert cfg.run.paths_base_url == "s3://commoncrawl/"
