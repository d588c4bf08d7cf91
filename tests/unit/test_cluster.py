"""The cluster side: launcher YAMLs valid for the installed Ray, KubeRay manifests that name
the pinned Ray version, and the check that a config's actors and workers fit a cluster."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import ray
import yaml

from casseat_ray import cluster
from casseat_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = sorted((ROOT / "cluster").glob("*.yaml"))
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
BIG = ROOT / "jobs" / "configs" / "qwen2vl-7b-mathv360k.yaml"


def test_there_are_launcher_configs_for_aws_and_gcp_and_kuberay_manifests():
    assert {p.name for p in LAUNCHER} >= {"aws.yaml", "gcp.yaml"}
    assert {p.name for p in KUBERAY} >= {"raycluster.yaml", "rayjob.yaml"}


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_yaml_is_valid_for_the_installed_ray(path):
    from jsonschema.exceptions import ValidationError

    spec = cluster.load_cluster(path)  # prepare_config + validate_config against ray/autoscaler/ray-schema.json
    assert spec["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    types = spec["available_node_types"]
    assert types[spec["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_groups = [t for t in types.values() if t.get("resources", {}).get("GPU")]
    assert len(gpu_groups) >= 2 and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_groups)
    assert any("[gpu]" in c for c in spec["setup_commands"])
    typo = copy.deepcopy(yaml.safe_load(path.read_text()))
    typo["available_node_types"]["cpu_workers"]["max_worker"] = 3
    with pytest.raises(ValidationError, match="Additional properties"):
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(typo))


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_parse_and_name_the_pinned_ray_version(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    groups = spec["workerGroupSpecs"]
    assert any(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in groups)
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in groups)
    if doc["kind"] == "RayJob":
        assert doc["spec"]["backoffLimit"] >= 1 and doc["spec"]["shutdownAfterJobFinishes"] is True
        entry = doc["spec"]["entrypoint"].split()
        assert entry[:2] == ["python", "jobs/run.py"]
        config = entry[entry.index("--config") + 1]
        assert (ROOT / config).is_file()
        assert any(a.startswith("output_dir=s3://") for a in entry)  # shared storage, never the job's temp copy
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-", dockerfile, re.M)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_the_real_scale_config_fits_the_shipped_clusters(name):
    cfg = load_config(BIG)
    problems, fits = cluster.check_fit(cfg, cluster.load_cluster(ROOT / "cluster" / name))
    assert problems == []
    assert any(line.startswith("synthesize: teacher engine actor: 16 x {CPU: 4, GPU: 1} fit") for line in fits)
    assert any(line.startswith("train: Ray Train worker: 8 x") for line in fits)
    assert any(line.startswith("train: Ray Data encoding task: 8 x {CPU: 1} fit") for line in fits)


def test_what_does_not_fit_is_named():
    spec = cluster.load_cluster(ROOT / "cluster" / "aws.yaml")
    cfg = load_config(BIG, ["teacher.engine.tensor_parallel_size=8", "teacher.placement.bundle={GPU: 1, CPU: 4}",
                            "teacher.concurrency=3", "train.num_workers=40", "ddf_source.model_filter.enabled=false"])
    problems, _ = cluster.check_fit(cfg, spec)
    assert len(problems) == 2
    # an 8-GPU engine packs on one node: only the 8-GPU training node holds one, and there is one such node
    assert problems[0] == ("synthesize: teacher engine actor: 3 of {GPU: 8, CPU: 32} asked, the cluster at its largest "
                           "holds 1 (gpu_train 1 x 1)")
    assert problems[1].startswith("train: Ray Train worker: 40 of {CPU: 8, GPU: 1} asked, the cluster at its largest holds 24")
    huge = load_config(BIG, ["teacher.engine.tensor_parallel_size=16", "teacher.placement.bundle={GPU: 1, CPU: 4}"])
    problems, _ = cluster.check_fit(huge, spec)
    assert problems[0].startswith("synthesize: teacher engine actor: one needs {GPU: 16, CPU: 64} on a single node; "
                                  "no node type offers that (largest: gpu_train")
    h100 = load_config(BIG, ["teacher.placement.accelerator_type=H100"])
    problems, _ = cluster.check_fit(h100, spec)
    assert any(p.startswith("synthesize: teacher engine actor: one needs") and "accelerator_type:H100" in p for p in problems)
