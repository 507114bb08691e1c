"""k8s/*.yaml: the KubeRay manifests, validated against KubeRay's own CRD schemas (the OpenAPI v3
schema of each kind, `spec.versions[].schema.openAPIV3Schema`, in ../shared/k8s/crds), and the
properties that make them safe and consistent with the rest of avray: Ray's token auth from a
Secret in every Ray container, no public dashboard, a head without tasks, the Serve config of
jobs/serve_config.yaml, an entrypoint that avray's own CLI parses. No Kubernetes here: what the
API server alone checks (CEL rules, ObjectMeta) and what the operator does are not exercised.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from subprocess import list2cmdline
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = ROOT.parent / "shared" / "k8s" / "crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
SECRET = "avray-auth"          # the one Secret (kubectl create secret generic avray-auth ...)
IMAGE_REPO = "/home/ray/avray"  # the repository's place in the image (k8s/Dockerfile WORKDIR)
DATA = "/data"                  # the shared volume's mount path (k8s/data-pvc.yaml)


def manifest(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / name).read_text())


def strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it with strict field validation (kubectl's default
    --validate=strict): an object schema that lists its properties refuses others (plain JSON
    Schema would let a misspelled field through; Kubernetes would reject it, or prune it
    silently), and OpenAPI's `nullable` admits null. `x-kubernetes-int-or-string` fields already
    carry `anyOf: [integer, string]`; other x-kubernetes-* keywords are annotations to jsonschema."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not")
           else v for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    return out


@functools.cache
def validator(kind: str, api_version: str) -> jsonschema.Draft4Validator:
    """A validator for `kind` at `api_version` from its CRD (OpenAPI v3.0 schemas are Draft 4's
    keywords: boolean exclusiveMinimum, no const)."""
    if not CRDS.is_dir():
        pytest.skip(f"no KubeRay CRDs at {CRDS}")
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert entry["served"] is True
    schema = strict(entry["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def errors(obj: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(JSON path, failed keyword, message) of every schema violation of a manifest, sorted."""
    v = validator(obj["kind"], obj["apiVersion"])
    return sorted((e.json_path, e.validator, e.message) for e in v.iter_errors(obj))


def ray_clusters() -> list[tuple[str, dict[str, Any]]]:
    """(where, RayCluster spec) of each Ray cluster the manifests define."""
    return [("raycluster.yaml", manifest("raycluster.yaml")["spec"]),
            ("rayservice.yaml", manifest("rayservice.yaml")["spec"]["rayClusterConfig"])]


def ray_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, container) of every container that runs Ray: each group's first (KubeRay's Ray
    container), the RayJob's submitter; the autoscaler's options stand for its sidecar."""
    for where, spec in ray_clusters():
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for name, group in groups:
            yield f"{where}:{name}", group["template"]["spec"]["containers"][0]
        yield f"{where}:autoscaler", spec["autoscalerOptions"]
    yield "rayjob.yaml:submitter", manifest("rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def all_documents() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


# --- the CRD schemas -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"])
def test_manifest_matches_its_kuberay_crd(name):
    obj = manifest(name)
    assert obj["apiVersion"] == "ray.io/v1"
    assert errors(obj) == []
    schema = validator(obj["kind"], obj["apiVersion"]).schema
    jsonschema.Draft4Validator(schema["properties"]["spec"]).validate(obj["spec"])  # the spec alone too


def test_schema_rejects_a_misspelled_required_field_at_its_path():
    obj = manifest("raycluster.yaml")
    group = obj["spec"]["workerGroupSpecs"][1]
    group["groupname"] = group.pop("groupName")
    assert errors(obj) == [
        ("$.spec.workerGroupSpecs[1]", "additionalProperties",
         "Additional properties are not allowed ('groupname' was unexpected)"),
        ("$.spec.workerGroupSpecs[1]", "required", "'groupName' is a required property"),
    ]


def test_schema_rejects_a_misspelled_optional_field_and_wrong_types():
    service = manifest("rayservice.yaml")
    service["spec"]["serveConfigv2"] = service["spec"].pop("serveConfigV2")
    assert errors(service) == [("$.spec", "additionalProperties",
                                "Additional properties are not allowed ('serveConfigv2' was unexpected)")]
    job = manifest("rayjob.yaml")
    job["spec"]["backoffLimit"] = "2"
    job["spec"]["clusterSelector"]["ray.io/cluster"] = 1
    assert errors(job) == [
        ("$.spec.backoffLimit", "type", "'2' is not of type 'integer'"),
        ("$.spec.clusterSelector['ray.io/cluster']", "type", "1 is not of type 'string'"),
    ]
    cluster = manifest("raycluster.yaml")
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    cluster["spec"]["authOptions"]["mode"] = "Token"
    assert errors(cluster) == [
        ("$.spec.authOptions.mode", "enum", "'Token' is not one of ['disabled', 'token']"),
        ("$.spec.headGroupSpec.rayStartParams['num-cpus']", "type", "0 is not of type 'string'"),
    ]


def test_schema_checks_int_or_string_quantities():
    cluster = manifest("raycluster.yaml")
    limits = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["cpu"] = 16  # an integer is a quantity too
    assert errors(cluster) == []
    limits["cpu"] = "sixteen"
    ((path, keyword, _),) = errors(cluster)
    assert (path, keyword) == ("$.spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.cpu", "pattern")


# --- security --------------------------------------------------------------------------------

def test_every_ray_container_has_token_auth_from_the_secret():
    seen = []
    for where, container in ray_containers():
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, where
        assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN",
                                         "valueFrom": {"secretKeyRef": {"name": SECRET, "key": "auth_token"}}}, where
        seen.append(where)
    assert len(seen) == 9  # 2 clusters x (head, cpu-decode, gpu-train, autoscaler) + the submitter
    for where, spec in ray_clusters():
        # the operator (its dashboard calls, the containers it adds) reads the same Secret; KubeRay's key is auth_token
        assert spec["authOptions"] == {"mode": "token", "secretName": SECRET}, where


def test_no_secret_value_in_the_repository():
    docs = all_documents()
    assert [d["kind"] for d in docs if d["kind"] == "Secret"] == []
    tokens = [e for d in docs for e in walk(d) if isinstance(e.get("name"), str) and e["name"].endswith("TOKEN")
              and ("value" in e or "valueFrom" in e)]
    # per cluster: RAY_AUTH_TOKEN + AVRAY_TOKEN in 3 groups, RAY_AUTH_TOKEN for the autoscaler; the submitter's
    assert len(tokens) == 2 * (3 * 2 + 1) + 1
    assert all("value" not in e and set(e["valueFrom"]) == {"secretKeyRef"} for e in tokens), tokens
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in tokens} == {SECRET}


def test_dashboard_port_is_not_exposed_outside_the_cluster():
    for where, spec in ray_clusters():
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP", where
        assert "headService" not in head and not head.get("enableIngress", False), where
        assert "dashboard-host" not in head["rayStartParams"], where  # KubeRay's default: the pod's own address
    service = manifest("rayservice.yaml")["spec"]["serveService"]
    assert service["spec"]["type"] == "ClusterIP"
    public = [d for d in all_documents() for s in walk(d) if s.get("type") in ("LoadBalancer", "NodePort")]
    assert public == []


def test_head_runs_no_tasks_and_workers_offer_decode_and_train():
    for where, spec in ray_clusters():
        assert spec["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}, where
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert sorted(groups) == ["cpu-decode", "gpu-train"]
        custom = {}
        for name, g in groups.items():
            (token,) = shlex.split(g["rayStartParams"]["resources"])  # KubeRay quotes it for `ray start`
            custom[name] = json.loads(token)
        limits = {n: g["template"]["spec"]["containers"][0]["resources"]["limits"] for n, g in groups.items()}
        assert custom == {"cpu-decode": {"decode": 1}, "gpu-train": {"train": 1}}  # markers (jobs/placement.py)
        launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
        assert custom == {"cpu-decode": launcher["cpu_decode"]["resources"],
                          "gpu-train": launcher["gpu_train"]["resources"]}  # the same as cluster.yaml's nodes
        assert "nvidia.com/gpu" not in limits["cpu-decode"] and limits["gpu-train"]["nvidia.com/gpu"] == 1


# --- consistency with the rest of avray ----------------------------------------------------------

def test_image_and_ray_version_match_cluster_yaml_and_the_installed_ray():
    import ray

    base = yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"]
    dockerfile = (K8S / "Dockerfile").read_text().splitlines()
    assert f"FROM {base}" in dockerfile and f"WORKDIR {IMAGE_REPO}" in dockerfile
    assert "RUN pip install --no-cache-dir -c constraints.txt -e ." in dockerfile
    ignored = (K8S / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "demo", "data"} <= set(ignored)
    images = {c["image"] for _, c in ray_containers() if "image" in c}
    assert images == {f"avray:0.1.0-ray{ray.__version__}-py311-gpu"}
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert {spec["rayVersion"] for _, spec in ray_clusters()} == {ray.__version__}


def test_ray_containers_run_in_avray_serves_serve_mode_and_mount_the_data():
    from jobs.serve import SERVE_ENV

    pvc = manifest("data-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for where, spec in ray_clusters():
        for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, where
            assert pod["containers"][0]["volumeMounts"] == [{"name": "data", "mountPath": DATA}], where
            assert pod["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}]


def test_rayservice_cluster_is_the_rayclusters_spec():
    ours, theirs = (copy.deepcopy(spec) for _, spec in ray_clusters())
    assert [(g["groupName"], g["minReplicas"]) for g in theirs["workerGroupSpecs"]] == [("cpu-decode", 1), ("gpu-train", 1)]
    for g in ours["workerGroupSpecs"] + theirs["workerGroupSpecs"]:
        del g["replicas"], g["minReplicas"]
    assert ours == theirs


def test_rayservice_serve_config_is_jobs_serve_config():
    from ray.serve.schema import ServeDeploySchema

    ours = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(ours)
    repo = yaml.safe_load((ROOT / "jobs" / "serve_config.yaml").read_text())
    ((app,), (repo_app,)) = ours["applications"], repo["applications"]
    assert [d["name"] for d in app["deployments"]] == ["Ingress", "Localizer", "Separator", "Captioner",
                                                       "Embedder", "Searcher"]
    assert app["deployments"] == repo_app["deployments"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == repo_app[key]
    assert app["args"].keys() == repo_app["args"].keys()
    moved = {k for k in app["args"] if app["args"][k] != repo_app["args"][k]}
    assert moved == {"localization", "separation", "captioning", "retrieval", "embeddings", "examples"}
    for task in ("localization", "separation", "captioning", "retrieval"):  # the shipped ones, in the image
        assert app["args"][task] == f"{IMAGE_REPO}/{repo_app['args'][task]}"
        assert (ROOT / repo_app["args"][task]).is_file()
    assert (app["args"]["embeddings"], app["args"]["examples"]) == (f"{DATA}/emb", f"{DATA}/media")
    assert ours["http_options"] == {**repo["http_options"], "host": "0.0.0.0"}
    assert ours["proxy_location"] == "EveryNode"


def parse(argv: list[str]) -> Any:
    """An `avray COMMAND ...` command line as avray's CLI parses it, into the command's CONFIG."""
    import importlib

    from jobs.cli import COMMANDS, add_dataclass_arguments, dataclass_from_args

    assert argv[0] == "avray", argv
    mod = importlib.import_module(COMMANDS[argv[1]])
    parser = argparse.ArgumentParser(prog=f"avray {argv[1]}", exit_on_error=False)
    add_dataclass_arguments(parser, mod.CONFIG)
    return dataclass_from_args(mod.CONFIG, parser.parse_args(argv[2:]))


def test_rayjob_runs_preprocess_then_train_as_the_cli_parses_them():
    from ray.runtime_env import RuntimeEnv

    from jobs.train import model_config

    spec = manifest("rayjob.yaml")["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": manifest("raycluster.yaml")["metadata"]["name"]}
    # KubeRay runs `ray job submit ... -- <entrypoint>` in the submitter's shell: a top-level `&&`
    # would run the second command there, not as part of the Ray job
    outer = shlex.split(spec["entrypoint"])
    assert outer[:2] == ["bash", "-c"] and len(outer) == 3 and "&&" not in outer
    assert shlex.split(list2cmdline(outer)) == outer  # how `ray job submit -- ARGS...` joins them for the job
    words = shlex.split(outer[2])
    split = words.index("&&")
    pre, train = parse(words[:split]), parse(words[split + 1:])
    assert pre.inputs == (f"{DATA}/videos/manifest.jsonl",) and pre.out == f"{DATA}/clips"
    assert (train.task, train.data, train.out) == ("localization", f"{DATA}/clips/clips", f"{DATA}/runs/localization")
    assert (train.num_workers, train.use_gpu, train.resume) == (2, "yes", True)  # a rerun resumes
    assert spec.get("backoffLimit", 0) == 0  # KubeRay rejects retries with a clusterSelector (kuberay#4527)
    model_config(train)  # the preset exists
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"] == IMAGE_REPO
    RuntimeEnv(**{**env, "working_dir": str(ROOT)})  # Ray checks the folder exists: here, this repository
    assert {"demo/", ".venv/", "data/"} <= set(env["excludes"])
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
