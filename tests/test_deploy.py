"""deploy/: the Dockerfile, the KubeRay RayJob and the `ray up` cluster, checked against the real schemas.

The RayJob is validated against KubeRay's published CRD (``v1``'s ``openAPIV3Schema``), read
from the project's sibling ``shared/ref/kuberay/`` folder; the cluster YAML goes through the
same ``prepare_config`` and ``validate_config`` that ``ray up`` runs. Every image names the
Ray version these tests run with, and every command the files and the README give is parsed
by dps_tune's own CLI parser and its config validation.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from dps_tune import cli
from dps_tune.config import load_file

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RAYJOB_CRD = ROOT.parent / "shared" / "ref" / "kuberay" / "ray.io_rayjobs.yaml"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMAGE = f"registry.example.com/dps-tune:{PROJECT['version']}"


def _dockerfile() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The Dockerfile's ARG defaults and its instructions (continuation lines joined), comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    instructions = [tuple(line.split(None, 1)) for line in lines]
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    return args, instructions


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def _dps_tune_command(command: str):
    """A `dps-tune …` command line, parsed by dps_tune's parser; its --set values checked against the config."""
    argv = shlex.split(command)
    assert argv[0] == "dps-tune", command
    args = cli.build_parser().parse_args(argv[1:])
    space = ROOT / "search_spaces" / Path(args.space).name  # the image holds search_spaces/ at /home/ray/
    load_file(space, args.set)  # unknown keys or bad values raise
    return args


def test_dockerfile_installs_the_wheel_on_rays_gpu_image_of_the_tested_ray_version():
    args, instructions = _dockerfile()
    (base,) = [_expand(rest, args) for op, rest in instructions if op == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-gpu", base)
    assert match, base
    assert match["ray"] == ray.__version__, f"{base}: these tests run Ray {ray.__version__}"
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", PROJECT["requires-python"])
    assert (int(match["py"]), int(match["minor"])) >= (int(minimum[1]), int(minimum[2])), base

    (install,) = [_expand(rest, args) for op, rest in instructions if op == "RUN" and "pip install" in rest]
    assert "--no-deps" not in install  # the wheel brings its dependencies
    assert f'"ray[tune,default]=={ray.__version__}"' in install  # pip keeps the image's Ray
    wheel = f"dps_tune-{PROJECT['version']}-py3-none-any.whl"  # the name `pip wheel .` gives
    copies = [rest.split() for op, rest in instructions if op == "COPY"]
    assert any(fnmatch.fnmatch(wheel, Path(src).name) for src, _ in copies), copies
    assert any(fnmatch.fnmatch(Path(src).name, Path(pattern).name)
               for src, _ in copies for pattern in install.split() if pattern.startswith("/tmp/wheels/"))

    # The build context is the repository root; its ignore file lets through exactly what is copied.
    allowed = [line[1:] for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert sorted(src for src, _ in copies) == sorted(allowed)
    spaces = [p for src, _ in copies if src.startswith("search_spaces/") for p in ROOT.glob(src)]
    assert {p.name for p in spaces} >= {"iwildcam_ce.yaml", "iwildcam_dps.yaml", "iwildcam_flyp.yaml"}


def _strict(schema):
    """The CRD schema as a Kubernetes API server applies it with strict field validation (kubectl's
    default): an object that lists its properties refuses any other, unless it preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayjob_validator():
    if not RAYJOB_CRD.is_file():
        pytest.skip(f"KubeRay's RayJob CRD is not at {RAYJOB_CRD} (the project's sibling shared/ folder)")
    crd = yaml.load(RAYJOB_CRD.read_text(), Loader=yaml.CSafeLoader)  # 25,000 lines: libyaml's loader
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft202012Validator(schema)


def _rayjob() -> dict:
    return yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())


def test_rayjob_runs_a_sweep_on_gpu_workers_with_s3_storage(rayjob_validator):
    job = _rayjob()
    assert not _errors(rayjob_validator, job)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]} == {IMAGE}
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if g["minReplicas"] >= 1
                  and all(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
                          for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group with a GPU in every pod"

    args = _dps_tune_command(job["spec"]["entrypoint"])
    assert args.command == "sweep" and args.address == "auto"
    assert args.storage.startswith("s3://"), args.storage
    # Every pod, workers included, writes checkpoints to s3:// and so gets the credentials.
    for pod in pods:
        for c in pod["template"]["spec"]["containers"]:
            assert any("secretRef" in source for source in c.get("envFrom", [])), c["name"]


def _errors(validator, document) -> set[str]:
    """Every schema violation, one line each (the validator's own messages print the whole schema)."""
    return {f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)}


@pytest.mark.parametrize("mistake", ["no minReplicas/maxReplicas", "a misspelt field", "a GPU count as a list"])
def test_the_crd_schema_refuses_a_broken_rayjob(rayjob_validator, mistake):
    """The schema catches real mistakes, so the valid manifest above means something."""
    job = copy.deepcopy(_rayjob())
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    where = "spec.rayClusterSpec.workerGroupSpecs.0"
    if mistake == "no minReplicas/maxReplicas":
        del group["minReplicas"], group["maxReplicas"]
        expected = {f"{where}: 'minReplicas' is a required property", f"{where}: 'maxReplicas' is a required property"}
    elif mistake == "a misspelt field":
        group["rayStartParam"] = group.pop("rayStartParams")
        expected = {f"{where}: Additional properties are not allowed ('rayStartParam' was unexpected)"}
    else:
        group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = [1]
        expected = {f"{where}.template.spec.containers.0.resources.limits.nvidia.com/gpu: "
                    "[1] is not valid under any of the given schemas"}
    assert _errors(rayjob_validator, job) == expected


def _ray_up_config(raw: dict) -> dict:
    """What `ray up` does to the file before it starts anything: defaults filled in, then checked."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _cluster_yaml() -> dict:
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"\n### Deploying: .*?(?=\n##)", text, re.S)
    assert match, "README has no 'Deploying' section"
    return match.group(0)


def test_ray_up_cluster_has_a_gpu_worker_type_and_shared_storage():
    raw = _cluster_yaml()
    config = _ray_up_config(raw)
    assert config["docker"]["image"] == IMAGE
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) >= 1 and t["min_workers"] >= 1 for t in workers.values()), workers
    assert not any("pip install" in c and "ray" in c for c in config["worker_setup_commands"]), \
        "a setup command would replace the image's Ray"

    # Shared storage: one EFS mount on every host, handed to every container at the same path.
    mount = " ".join(config["initialization_commands"])
    assert re.search(r"mount -t nfs4 .*efs\.[\w-]+\.amazonaws\.com:/ /efs", mount), mount
    assert "--volume /efs:/efs" in config["docker"]["run_options"]

    # The README's sweep on this cluster keeps its experiment on that storage, and says so.
    section = _readme_section()
    (remote,) = re.findall(r"ray exec deploy/cluster\.yaml '(dps-tune sweep [^']+)'", section)
    args = _dps_tune_command(remote)
    assert args.storage.startswith("/efs/") and args.shared_storage, remote


def test_ray_up_validation_refuses_a_fractional_gpu_node_type():
    raw = _cluster_yaml()
    _ray_up_config(raw)
    raw["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'integer'"):
        _ray_up_config(raw)


def test_readme_shows_each_deploy_command():
    section = _readme_section()
    commands = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
                for line in block.splitlines()]
    for needed in ("pip wheel --no-deps -w dist .", "docker build -f deploy/Dockerfile -t",
                   "kubectl apply -f deploy/rayjob.yaml", "ray up deploy/cluster.yaml", "ray down deploy/cluster.yaml"):
        assert any(c.startswith(needed) for c in commands), needed
    assert f"dps-tune:{PROJECT['version']}" in section
