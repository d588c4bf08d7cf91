"""``casseat run``: synthesize -> train -> evaluate as one resumable run under one output tree.

The loop (``run``) is the whole pipeline. Each finished step is recorded in
``OUTPUT_DIR/NAME/run.json`` with a fingerprint of what its outputs depend on. A rerun skips
the steps recorded as finished, continues an unfinished one where it stopped (synthesis and
evaluation from their part files, training from its last checkpoint), and refuses a finished
step whose config changed since, naming the step to restart from. ``--from STEP`` redoes that
step from scratch and every step after it. Ray starts once for all steps. At the end one
summary (``summary.json``): the synthesis funnel, the final training loss, accuracy per model
and mode with intervals, wall time per step.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import time

from casseat_ray import parts as partstore
from casseat_ray import storage
from casseat_ray.config import INPUT_PARTS, Config, ConfigError, check_inputs

STEPS = ("synthesize", "train", "evaluate")


class StepFailed(RuntimeError):
    """A step stopped without finishing (its partial outputs are kept for a rerun)."""


# ---------------------------------------------------------------- checks and state
def check(cfg: Config) -> None:
    """Everything the three steps need, before Ray or any engine starts."""
    from casseat_ray.evaluate import job

    problems = []
    if not cfg.sources:
        problems.append("sources: no source configured (synthesis needs at least one)")
    for key in ("teacher", "student"):
        if getattr(cfg, key) is None:
            problems.append(f"{key}.model: the run needs a {key}")
    problems += check_inputs(cfg, INPUT_PARTS)
    if problems:
        raise ConfigError("\n".join(problems))
    job.check(cfg, adapter=bool(cfg.evaluate.adapter))  # the run's own adapter does not exist yet


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_fingerprint(cfg: Config, step: str) -> str:
    """What a step's outputs depend on. Training depends on the SFT set (the synthesis
    fingerprint) and its own sections; evaluation on its sections and the adapter's bytes."""
    from casseat_ray.evaluate import job
    from casseat_ray.synth import pipeline

    if step == "synthesize":
        return _digest(pipeline.fingerprint(cfg))
    if step == "train":
        return _digest(partstore.fingerprint(cfg, ("student", "train"), {"train": ("log_every",)}, {"sft": pipeline.fingerprint(cfg)}))
    return _digest(job.fingerprint(cfg))


def state_path(cfg: Config):
    return cfg.run_dir / "run.json"


def load_state(cfg: Config) -> dict:
    path = state_path(cfg)
    return json.loads(path.read_text()) if path.is_file() else {"steps": {}}


def _save_state(cfg: Config, state: dict) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    partstore.atomic_write_text(state_path(cfg), json.dumps(state, indent=2) + "\n")


# ---------------------------------------------------------------- the steps
def _synthesize(cfg: Config, fresh: bool, progress: bool) -> dict:
    from casseat_ray.synth import pipeline

    stats = pipeline.run(cfg, fresh=fresh, progress=progress)
    if not stats.get("stages"):
        raise StepFailed(f"synthesis stopped early: {stats}")
    if stats.get("failed"):
        raise StepFailed(f"synthesis failed: {stats['failed']}")
    return stats


def _train(cfg: Config, fresh: bool, progress: bool) -> dict:
    from casseat_ray.train import run as train_run

    if fresh:  # a redo starts from the new SFT set, not from the old run's checkpoints
        for name in train_run.run_names(cfg):
            storage.delete(train_run.checkpoint_dir(cfg, name))
        shutil.rmtree(train_run.train_dir(cfg), ignore_errors=True)
    return train_run.run(cfg, resume=train_run.has_checkpoints(cfg), progress=progress)


def _evaluate(cfg: Config, fresh: bool, progress: bool) -> dict:
    from casseat_ray.evaluate import job

    rep = job.run(cfg, fresh=fresh, progress=progress)
    if "results" not in rep:
        raise StepFailed(f"evaluation stopped early: {rep}")
    return rep


RUNNERS = {"synthesize": _synthesize, "train": _train, "evaluate": _evaluate}


def run(cfg: Config, start: str | None = None, progress: bool = True, log=print) -> dict:
    """Run (or continue) the pipeline of ``cfg``; ``start`` redoes that step and the ones after.
    Returns the summary written to ``summary.json``."""
    from casseat_ray.runtime import init_ray

    if start is not None and start not in STEPS:
        raise ConfigError(f"--from: unknown step {start!r}; steps are {', '.join(STEPS)}")
    check(cfg)
    redo = set(STEPS[STEPS.index(start):]) if start else set()
    t0 = time.perf_counter()
    with storage.mirrored(cfg.run_dir, cfg.run_uri) as mirror:
        state = load_state(cfg)
        for step in redo:  # forgotten at once: an interrupted redo must not leave old records behind
            state["steps"].pop(step, None)
        for step in STEPS:
            record = state["steps"].get(step)
            if record and record.get("status") == "done":
                if record["fingerprint"] != step_fingerprint(cfg, step):
                    raise ConfigError(f"step {step!r} finished with a different config than this one; "
                                      f"rerun with --from {step} to redo it and the steps after it")
                log(f"[casseat run] {step}: finished earlier ({record['seconds']:.0f}s), skipped")
                continue
            log(f"[casseat run] {step}: {'redoing' if step in redo else ('continuing' if record else 'starting')}")
            init_ray(cfg.ray)  # once, before the first step that runs (quiet: results are printed here)
            for later in STEPS[STEPS.index(step) + 1:]:  # their inputs are about to change
                state["steps"].pop(later, None)
            state["steps"][step] = {"status": "running", "started_at": _now()}
            _save_state(cfg, state)
            s0 = time.perf_counter()
            RUNNERS[step](cfg, step in redo, progress)
            state["steps"][step] = {"status": "done", "fingerprint": step_fingerprint(cfg, step),
                                    "seconds": round(time.perf_counter() - s0, 1), "finished_at": _now()}
            _save_state(cfg, state)
            mirror.push()  # a finished step reaches the shared storage before the next starts
        out = summary(cfg, state, wall_seconds=time.perf_counter() - t0)
        partstore.atomic_write_text(cfg.run_dir / "summary.json", json.dumps(out, indent=2) + "\n")
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- the summary
def summary(cfg: Config, state: dict, wall_seconds: float) -> dict:
    """One record of the run, from the files the steps wrote."""
    from casseat_ray.train.run import read_metrics, train_dir

    run_dir = cfg.run_dir
    stats = json.loads((run_dir / "stats.json").read_text())
    funnel = {name: {"in": st["in"], "out": st["out"], "rejected": sum(st["rejected"].values()), "by_reason": st["rejected"]}
              for name, st in stats["stages"].items()}
    tdir = train_dir(cfg)
    tsum = json.loads((tdir / "summary.json").read_text())
    losses = [r["loss"] for r in read_metrics(tdir / "metrics.jsonl") if r.get("loss") is not None]
    train = {"final_loss": losses[-1] if losses else None, "first_loss": losses[0] if losses else None,
             "steps": tsum["steps"], "samples": tsum["samples"], "adapter": storage.join(cfg.run_uri, "train", "adapter") if cfg.run_uri else tsum["adapter"]}
    rep = json.loads((run_dir / "eval" / "report.json").read_text())
    return {
        "name": cfg.name,
        "outputs": cfg.run_uri or str(run_dir),
        "funnel": funnel,
        "kept": stats["stages"]["ddf_labeled"]["out"] if "ddf_labeled" in stats["stages"] else None,
        "questions": next(iter(stats["stages"].values()))["in"],
        "sft": stats["sft"],
        "train": train,
        "eval": eval_table(rep["results"]),
        "steps": {s: {"seconds": state["steps"][s]["seconds"]} for s in STEPS},
        "wall_seconds": round(wall_seconds, 1),
    }


def eval_table(results: list[dict]) -> dict:
    """``{model: {mode: {accuracy, n, ci95, benchmarks: {name: {accuracy, n, ci95}}}}}``: the
    top-level accuracy pools every benchmark's items (with one benchmark, it is that one's)."""
    table: dict = {}
    for r in results:
        cell = table.setdefault(r["model"], {}).setdefault(r["mode"], {"benchmarks": {}})
        cell["benchmarks"][r["benchmark"]] = {"accuracy": r["accuracy"], "n": r["n"], "ci95": r.get("ci95")}
    for modes in table.values():
        for cell in modes.values():
            per = list(cell["benchmarks"].values())
            n = sum(b["n"] for b in per)
            cell["n"] = n
            cell["accuracy"] = sum(b["accuracy"] * b["n"] for b in per) / n if n else None
            cell["ci95"] = per[0]["ci95"] if len(per) == 1 else None
    return table
