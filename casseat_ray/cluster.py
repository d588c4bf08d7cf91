"""Does a run's config fit a Ray cluster-launcher YAML? (``casseat validate CONFIG --cluster``)

Each step asks for actors or workers of one shape: teacher engines (one GPU each, or a
placement group of tensor x pipeline bundles packed on one node), the student filter and the
judge, Ray Train workers, evaluation engines. The steps run one after another, so each is
checked on its own against the cluster at its maximum size: one unit must fit the largest
node type, and all units must fit the node types' ``max_workers`` (capped by the cluster's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from casseat_ray.config import Config, EngineConfig, PlacementConfig


@dataclass(frozen=True)
class Demand:
    what: str  # e.g. "synthesize: teacher engine actor"
    unit: dict[str, float]  # resources of one actor / worker, all on one node
    count: int


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_count: int


def load_cluster(path: str | Path) -> dict:
    """The cluster YAML, checked against the schema that ships with the installed Ray."""
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # prepare_config narrates its defaults
    raw = yaml.safe_load(Path(path).read_text())
    validate_config(prepare_config(raw))  # raises on unknown keys and wrong types
    return raw


def node_types(cluster: dict) -> list[NodeType]:
    cap = cluster.get("max_workers", 2)
    head = cluster.get("head_node_type")
    out = []
    for name, t in cluster.get("available_node_types", {}).items():
        count = 1 if name == head else min(t.get("max_workers", cap), cap)
        res = {k: float(v) for k, v in (t.get("resources") or {}).items()}
        out.append(NodeType(name, res, count))
    return out


def _engine_unit(engine: EngineConfig, num_cpus: float, num_gpus: float, placement: PlacementConfig) -> dict[str, float]:
    devices = engine.devices
    if devices == 1:
        unit = {"CPU": num_cpus, "GPU": num_gpus}
    else:  # STRICT_PACK (the default) puts every bundle on one node
        unit = {k: v * devices for k, v in placement.bundle.items()}
    if placement.accelerator_type:
        unit[f"accelerator_type:{placement.accelerator_type}"] = 0.001
    return {k: v for k, v in unit.items() if v}


def demands(cfg: Config) -> list[Demand]:
    out = []
    placement = cfg.teacher.placement if cfg.teacher else PlacementConfig()
    if cfg.teacher:
        t = cfg.teacher
        out.append(Demand("synthesize: teacher engine actor", _engine_unit(t.engine, t.num_cpus, t.num_gpus, placement), t.concurrency))
        j = cfg.ddf_labeled.judge
        if j.enabled:
            out.append(Demand("synthesize: judge engine actor", _engine_unit(cfg.judge_engine, j.num_cpus, j.num_gpus, placement), j.concurrency))
        if cfg.student and cfg.ddf_source.model_filter.enabled:
            out.append(Demand("synthesize: student filter engine actor", _engine_unit(cfg.student.engine, t.num_cpus, t.num_gpus, placement), t.concurrency))
    tr = cfg.train
    worker = {"CPU": tr.cpus_per_worker, **({"GPU": 1.0} if tr.use_gpu else {})}
    out.append(Demand("train: Ray Train worker", worker, max(tr.num_workers, 1)))
    if tr.data_cpus:  # each worker's rows are read and encoded by Ray Data tasks beside it
        out.append(Demand("train: Ray Data encoding task", {"CPU": tr.data_cpus}, max(tr.num_workers, 1)))
    e = cfg.evaluate
    if cfg.student and tr.loss == "aft" and tr.aft.samples == "student":
        out.append(Demand("train: AFT student sampling engine actor", _engine_unit(e.engine or cfg.student.engine, e.num_cpus, e.num_gpus, placement),
                          e.concurrency))
    if e.benchmarks and cfg.student and any(m in e.models for m in ("base", "tuned")):
        out.append(Demand("evaluate: student engine actor", _engine_unit(e.engine or cfg.student.engine, e.num_cpus, e.num_gpus, placement), e.concurrency))
    if e.benchmarks and cfg.teacher and "teacher" in e.models:
        t = cfg.teacher
        out.append(Demand("evaluate: teacher engine actor", _engine_unit(t.engine, t.num_cpus, t.num_gpus, placement), t.concurrency))
    return out


def per_node(unit: dict[str, float], resources: dict[str, float]) -> int:
    """How many units one node of these resources holds."""
    counts = [math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in unit.items() if v > 0]
    return min(counts) if counts else 0


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items()) + "}"


def check_fit(cfg: Config, cluster: dict) -> tuple[list[str], list[str]]:
    """(problems, lines that fit) for every demand of ``cfg`` on ``cluster``."""
    types = node_types(cluster)
    problems, fits = [], []
    if not any(t.resources for t in types):
        return ["cluster: no node type declares its resources; give each available_node_types entry a resources map"], []
    for d in demands(cfg):
        held = {t.name: per_node(d.unit, t.resources) for t in types}
        capacity = sum(held[t.name] * t.max_count for t in types)
        if not any(held.values()):
            biggest = max(types, key=lambda t: (t.resources.get("GPU", 0), t.resources.get("CPU", 0)))
            problems.append(f"{d.what}: one needs {_fmt(d.unit)} on a single node; no node type offers that "
                            f"(largest: {biggest.name} {_fmt(biggest.resources)})")
        elif capacity < d.count:
            where = ", ".join(f"{n} {h} x {t.max_count}" for t in types for n, h in [(t.name, held[t.name])] if h)
            problems.append(f"{d.what}: {d.count} of {_fmt(d.unit)} asked, the cluster at its largest holds {capacity} ({where})")
        else:
            fits.append(f"{d.what}: {d.count} x {_fmt(d.unit)} fit (up to {capacity} at the cluster's largest)")
    return problems, fits
