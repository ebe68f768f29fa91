"""cluster/: every manifest parses, has the fields KubeRay / the cluster launcher need, and
agrees with jobs/ (entrypoints, config files) and docker/ (images, Ray version)."""
from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from effsft.cli import JOBS

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
AWS = ROOT / "cluster" / "aws" / "cluster.yaml"
RAY_KINDS = {"RayCluster", "RayJob"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def built_images() -> dict[str, str]:
    """image tag -> Dockerfile, from the build commands in docker/README.md."""
    text = (ROOT / "docker" / "README.md").read_text()
    return dict((tag, f) for f, tag in re.findall(r"docker build -f (docker/\S+) .*?-t (\S+) \.", text))


def dockerfile_arg(dockerfile: str, name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)", (ROOT / dockerfile).read_text(), re.M)
    assert m, f"{dockerfile}: no default for ARG {name}"
    return m.group(1).strip('"')


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_rayjobs", KUBERAY / "make_rayjobs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pods(cluster_spec: dict):
    """(group name, pod spec, rayStartParams, group) for the head and every worker group."""
    head = cluster_spec["headGroupSpec"]
    yield "head", head["template"]["spec"], head["rayStartParams"], head
    for g in cluster_spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"], g["rayStartParams"], g


def _config_class(job: str):
    mod, name = JOBS[job].config.split(":")
    return getattr(importlib.import_module(mod), name)


def _has_key(cls, dotted: str) -> bool:
    from pydantic import BaseModel
    import typing

    for part in dotted.split("."):
        if part not in getattr(cls, "model_fields", {}):
            return False
        ann = cls.model_fields[part].annotation
        models = [a for a in (ann, *typing.get_args(ann))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        cls = models[0] if models else None
    return True


# ---- every file parses ----------------------------------------------------------------

def test_every_cluster_yaml_parses():
    files = sorted((ROOT / "cluster").rglob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        docs = _docs(f)
        assert docs and all(isinstance(d, dict) for d in docs), f


# ---- RayCluster ---------------------------------------------------------------------------

def check_cluster_spec(spec: dict, where: str) -> None:
    images = built_images()
    assert spec["rayVersion"] == dockerfile_arg("docker/Dockerfile.cpu", "RAY_VERSION"), where
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth off"
    assert spec.get("enableInTreeAutoscaling") is True, where
    groups = {name: (pod, params, g) for name, pod, params, g in _pods(spec)}
    assert groups["head"][1].get("num-cpus") == "0", f"{where}: tasks would land on the head"
    gpu_groups = 0
    for name, (pod, params, g) in groups.items():
        (c,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
        assert c["image"] in images, f"{where}/{name}: {c['image']} is not built in docker/"
        gpus = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        want = "docker/Dockerfile.cuda" if gpus else "docker/Dockerfile.cpu"
        assert images[c["image"]] == want, f"{where}/{name}: {c['image']} for gpus={gpus}"
        gpu_groups += gpus > 0
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/mnt/effsft", "/config"} <= mounts, f"{where}/{name}: {mounts}"
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["jobs"]["configMap"]["name"] == "effsft-jobs"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        if name != "head":
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}/{name}"
            assert g["maxReplicas"] > 0
    assert gpu_groups >= 1, f"{where}: no GPU worker group"


def test_raycluster():
    (doc,) = _docs(KUBERAY / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    check_cluster_spec(doc["spec"], "raycluster.yaml")


def test_storage_claim_is_shared():
    (doc,) = _docs(KUBERAY / "storage.yaml")
    assert doc["kind"] == "PersistentVolumeClaim" and doc["metadata"]["name"] == "effsft-shared"
    assert doc["spec"]["accessModes"] == ["ReadWriteMany"]


# ---- RayJobs ------------------------------------------------------------------------------

def test_every_job_has_a_rayjob_and_no_orphans():
    have = {p.name for p in KUBERAY.glob("rayjob-*.yaml")}
    want = {f"rayjob-{job}.yaml" for job in JOBS}
    assert want <= have, f"missing RayJobs (run cluster/kuberay/make_rayjobs.py): {want - have}"
    assert have <= want, f"RayJobs for unknown jobs: {have - want}"


@pytest.mark.parametrize("job", sorted(JOBS))
def test_rayjob(job):
    path = KUBERAY / f"rayjob-{job}.yaml"
    (doc,) = _docs(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    s = doc["spec"]
    argv = s["entrypoint"].split()
    cfg = f"{job.replace('-', '_')}.yaml"
    assert argv[:5] == ["python", "-m", "effsft", job, f"/config/{cfg}"], s["entrypoint"]
    assert (ROOT / "jobs" / cfg).is_file()             # what the ConfigMap will hold
    for override in argv[5:]:
        key = override.split("=", 1)[0]
        assert "=" in override and _has_key(_config_class(job), key), f"{job}: {override}"
    assert s["submissionMode"] in ("HTTPMode", "SidecarMode")
    if s["submissionMode"] == "SidecarMode":
        assert s["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert s["shutdownAfterJobFinishes"] is True
    assert isinstance(s["ttlSecondsAfterFinished"], int) and s["ttlSecondsAfterFinished"] >= 0
    assert isinstance(s["backoffLimit"], int) and s["backoffLimit"] >= 0
    assert isinstance(s["activeDeadlineSeconds"], int) and s["activeDeadlineSeconds"] > 0
    assert isinstance(yaml.safe_load(s["runtimeEnvYAML"]), dict)
    check_cluster_spec(s["rayClusterSpec"], path.name)


def test_rayjobs_are_generated_from_raycluster():
    gen = _load_generator()
    spec = _docs(KUBERAY / "raycluster.yaml")[0]["spec"]
    for job in JOBS:
        committed = (KUBERAY / f"rayjob-{job}.yaml").read_text()
        assert committed == gen.render(job, spec), \
            f"rayjob-{job}.yaml is stale: run python cluster/kuberay/make_rayjobs.py"


# ---- AWS cluster launcher -------------------------------------------------------------------

def test_aws_cluster_launcher():
    (c,) = _docs(AWS)
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands", "max_workers"):
        assert key in c, key
    assert c["provider"]["type"] == "aws" and c["provider"]["region"]
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    assert types[c["head_node_type"]]["resources"].get("CPU") == 0
    images = built_images()
    assert c["docker"]["head_image"] in images and c["docker"]["worker_image"] in images
    assert images[c["docker"]["head_image"]] == "docker/Dockerfile.cpu"
    total = 0
    for name, t in types.items():
        assert t["node_config"]["InstanceType"], name
        if name != c["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"], name
            total += t["max_workers"]
        img = t.get("docker", {}).get("worker_image")
        if img:
            assert images[img] == ("docker/Dockerfile.cuda" if "gpu" in name else "docker/Dockerfile.cpu")
    assert total <= c["max_workers"]
    run = " ".join(c["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run and "/mnt/effsft:/mnt/effsft" in run
    assert any("--dashboard-host=127.0.0.1" in cmd for cmd in c["head_start_ray_commands"])
    assert (ROOT / c["file_mounts"]["/config"]).is_dir()


# ---- local cluster script -------------------------------------------------------------------

def test_local_cluster_script_is_loopback_and_never_ray_stop():
    text = (ROOT / "cluster" / "local_cluster.sh").read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "ray stop" not in code            # would kill every Ray on the machine
    assert "0.0.0.0" not in code
    assert "--node-ip-address 127.0.0.1" in code and "--dashboard-host 127.0.0.1" in code
    assert "RAY_AUTH_MODE=token" in code and "RAY_AUTH_TOKEN_PATH" in code
