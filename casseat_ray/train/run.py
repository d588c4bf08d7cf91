"""Driver side of training: checks, the TorchTrainer, the loss curve, adapter export."""

from __future__ import annotations

import json
from pathlib import Path

from casseat_ray import storage
from casseat_ray.adapters import adapter_problems, shipped
from casseat_ray.config import Config, ConfigError, with_absolute_models
from casseat_ray.train import checkpoints


class TrainingFailed(RuntimeError):
    """Ray Train gave up on the run: its workers failed on every attempt it was allowed."""


def training_failure(error: BaseException, max_failures: int, checkpoint: str | None) -> BaseException:
    """``error`` from ``trainer.fit()`` as one line a person can act on when it is the workers'
    (the lowest failing rank's own error, its last line); any other error as it is."""
    from ray.train import WorkerGroupError

    from casseat_ray.runtime import last_line

    if not isinstance(error, WorkerGroupError) or not error.worker_failures:
        return error
    rank = min(error.worker_failures)
    cause = last_line(error.worker_failures[rank])
    return TrainingFailed(f"training failed on worker {rank}, {max_failures + 1} time(s) in a row (train.max_failures={max_failures}): "
                          f"{cause[:500]}; " + (f"the last checkpoint is kept ({checkpoint}): fix the cause and rerun with --resume"
                                                 if checkpoint else "no checkpoint was written: fix the cause and rerun"))


def sft_path(cfg: Config, override: str | Path | None = None) -> Path:
    path = Path(override) if override else cfg.run_dir / "sft"
    stats = cfg.run_dir / "stats.json"
    if not override and stats.exists():  # the run's own set: not one its synthesis called a failure
        failed = json.loads(stats.read_text()).get("failed")
        if failed:
            raise ConfigError(f"{path}: written by a synthesis that failed ({failed}); fix the cause and rerun "
                              "`casseat synthesize`, or pass --data to train on it anyway")
    if not path.exists() or not (path.is_file() or list(path.glob("*.parquet"))):
        raise ConfigError(f"{path}: no SFT Parquet found (run `casseat synthesize` first, or pass --data)")
    return path


def train_dir(cfg: Config) -> Path:
    return cfg.run_dir / "train"


def storage_root(cfg: Config) -> str:
    """``ray.storage_path`` as Ray Train gets it: a URI as given, a local path made absolute."""
    path = cfg.ray.storage_path
    return path if storage.is_uri(path) else str(Path(path).expanduser().resolve())


def checkpoint_dir(cfg: Config, name: str | None = None) -> str:
    """Where Ray Train keeps the checkpoints of the run ``name`` (default: the run's own)."""
    return storage.join(storage_root(cfg), name or cfg.name)


def run_names(cfg: Config) -> list[str]:
    """The Ray Train runs of this training: AFT on the student's answers has a stage-1 run."""
    from casseat_ray.train import aft

    return [aft.stage1_name(cfg), cfg.name] if aft.student_samples(cfg) else [cfg.name]


def checkpoint_names(cfg: Config, name: str | None = None) -> list[str]:
    """The checkpoint folders of the run ``name``, oldest first."""
    return checkpoints.folder_names(storage.list_names(checkpoint_dir(cfg, name)))


def has_checkpoints(cfg: Config) -> bool:
    """Whether any run of this training has written a checkpoint."""
    return any(checkpoint_names(cfg, n) for n in run_names(cfg))


def newest_checkpoint(cfg: Config, name: str | None = None) -> str | None:
    names = checkpoint_names(cfg, name)
    return storage.join(checkpoint_dir(cfg, name), names[-1]) if names else None


def check_run_name(cfg: Config, resume: bool) -> None:
    """Ray Train resumes any run whose name it finds in storage; a new run must not
    silently continue an old one."""
    for name in run_names(cfg):
        if not resume and checkpoint_names(cfg, name):
            raise ConfigError(f"train run {name!r} already has checkpoints in {checkpoint_dir(cfg, name)}; pass --resume to continue it, "
                              "or choose another name=")


def check_init_adapter(cfg: Config) -> None:
    """``train.init_adapter`` must be a LoRA adapter of the student with the configured shape."""
    if not cfg.train.init_adapter:
        return
    problems, meta = adapter_problems(Path(cfg.train.init_adapter), "train.init_adapter", cfg.student.model)
    lora = cfg.student.lora
    if meta and not problems and (meta.get("r"), meta.get("lora_alpha")) != (lora.r, lora.alpha):
        problems.append(f"train.init_adapter: {cfg.train.init_adapter} has rank {meta.get('r')} and alpha {meta.get('lora_alpha')}; "
                        f"student.lora asks for rank {lora.r} and alpha {lora.alpha}")
    if problems:
        raise ConfigError("\n".join(problems))


@storage.mirrors_run_dir
def run(cfg: Config, resume: bool = False, data: str | Path | None = None, progress: bool = True) -> dict:
    """Train the student (or resume training it); returns the summary. With AFT on the
    student's own answers, the three steps of ``train.aft``: stage 1, sampling, stage 2."""
    from casseat_ray.runtime import init_ray
    from casseat_ray.train import aft

    if cfg.student is None:
        raise ConfigError("train needs student.model")
    check_init_adapter(cfg)
    cfg = with_absolute_models(cfg)
    path = sft_path(cfg, data)
    if aft.student_samples(cfg):
        check_scorable(path)
    check_run_name(cfg, resume)
    out = train_dir(cfg).resolve()
    init_ray(cfg.ray, worker_output=True)  # the workers print the progress lines
    if not aft.student_samples(cfg):
        summary = fit(cfg, path, cfg.name, out)
        if cfg.train.loss == "aft":
            summary["aft"] = {"samples": "teacher"}
            _write_summary(out, summary)
        return summary
    stage1 = aft.read_summary(out / aft.STAGE1_DIR)  # a finished stage 1 is kept
    if stage1 is None:
        stage1 = fit(aft.stage1_config(cfg), path, aft.stage1_name(cfg), out / aft.STAGE1_DIR, "train/stage1")
    adapter = Path(stage1["adapter"])
    sampled = aft.sample(cfg, path, adapter, out, progress)
    summary = fit(aft.stage2_config(cfg, adapter), Path(sampled["sft"]), cfg.name, out)
    summary["aft"] = {"samples": "student", "stage1": {k: stage1[k] for k in ("steps", "samples", "adapter")}, "sampling": sampled}
    _write_summary(out, summary)
    return summary


def _write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def check_scorable(path: Path) -> None:
    """AFT on the student's answers scores them: the SFT set must say how (choices, precision)."""
    import pyarrow.dataset as pads

    names = set(pads.dataset(str(path), format="parquet").schema.names)
    missing = [c for c in ("answer", "answer_type", "choices", "precision") if c not in names]
    if missing:
        raise ConfigError(f"{path}: train.aft.samples=student scores the student's answers, but the SFT set has no "
                          f"{', '.join(missing)} column(s); rerun `casseat synthesize` (its SFT set carries them) or use train.aft.samples=teacher")


def fit(cfg: Config, path: Path, name: str, out: Path, subdir: str = "train") -> dict:
    """One Ray Train run named ``name`` (continued by Ray Train when storage holds it) on the
    SFT set at ``path``; its adapter, metrics, loss
    curve and summary go to ``out`` (and to ``RUN_URI/subdir`` with a URI output)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from casseat_ray.train.loop import train_loop_per_worker
    from casseat_ray.train.stream import RankSplit

    out_uri = storage.join(cfg.run_uri, subdir) if cfg.run_uri else None
    t = cfg.train
    plan = plan_run(cfg, path)
    # the workers' nodes get the adapter to start from through the object store
    with shipped(Path(t.init_adapter) if t.init_adapter else None) as init:
        trainer = TorchTrainer(
            train_loop_per_worker,
            # With URI outputs the rank-0 worker, on whichever node, also copies its outputs there.
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "plan": plan.to_dict(), "out_dir": str(out), "out_uri": out_uri,
                               "init_adapter": init},
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}),
            run_config=RunConfig(
                name=name, storage_path=storage_root(cfg),
                checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                failure_config=FailureConfig(max_failures=t.max_failures),
            ),
            # Each worker's rows stream in, read and encoded by Ray Data tasks while it trains.
            datasets={"train": read_sft(path, t)},
            dataset_config=RankSplit(cfg.student.model, t, [frozenset(s for w in ws for u in w for s in u) for ws in plan.windows]),
        )
        try:
            result = trainer.fit()  # raises the run's error once Ray Train gives up
        except Exception as exc:
            failure = training_failure(exc, t.max_failures, newest_checkpoint(cfg, name))
            if failure is exc:
                raise
            raise failure from exc
    if out_uri:
        storage.copy_tree(out_uri, out)
    summary = json.loads((out / "summary.json").read_text())
    summary["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    summary["init_adapter"] = t.init_adapter
    loss_curve(out / "metrics.jsonl", out / "loss.png", name)
    _write_summary(out, summary)
    return summary


def read_sft(path: Path, t, columns: list[str] | None = None):
    """The SFT set (``columns`` of it) as a Ray dataset whose read tasks ask for the CPUs of
    the encoding tasks, so that Ray Data fuses read and encode into one task and the pair fits
    beside the workers (a read task asks for a whole CPU by default)."""
    import ray.data

    return ray.data.read_parquet(str(path), columns=columns, num_cpus=t.data_cpus)


def plan_run(cfg: Config, path: Path):
    """Measure the SFT set in Ray Data (before the workers hold their CPUs) and plan the run;
    a set that cannot fill one step stops here, before any worker starts."""
    from casseat_ray.train.stream import measure_set, plan

    t = cfg.train
    measured = measure_set(read_sft(path, t), cfg.student.model, t)
    try:
        return plan(measured, t, max(t.num_workers, 1))
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def read_metrics(path: Path) -> list[dict]:
    """Metric records, the last one per step (a resumed run may have repeated a few)."""
    by_step = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]


def loss_curve(metrics: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    steps = [r["step"] for r in records if r["loss"] is not None]
    losses = [r["loss"] for r in records if r["loss"] is not None]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(steps, losses, marker="." if len(steps) < 50 else None, color="#4c72b0")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss", color="#4c72b0")
    ax2 = ax1.twinx()
    ax2.plot([r["step"] for r in records], [r["lr"] for r in records], color="#dd8452", alpha=0.6)
    ax2.set_ylabel("learning rate", color="#dd8452")
    ax1.set_title(f"{title}: student LoRA training")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def export(cfg: Config, adapter: str | Path | None = None, merged: str | Path | None = None) -> dict:
    """The trained adapter (peft format, loadable by vLLM with enable_lora) and optionally
    a merged full model in Hugging Face format."""
    adapter = Path(adapter) if adapter else train_dir(cfg) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter}: no peft adapter (adapter_config.json) found; train first or pass --adapter")
    out = {"adapter": str(adapter)}
    if merged:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText, AutoProcessor

        base = AutoModelForImageTextToText.from_pretrained(cfg.student.model, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        model.save_pretrained(merged)
        hub_layout(merged)
        AutoProcessor.from_pretrained(cfg.student.model).save_pretrained(merged)
        out["merged"] = str(merged)
    return out


def hub_layout(model_dir: str | Path) -> None:
    """Rename a saved LLaVA's vision-tower weights to the layout of the hub's LLaVA checkpoints.

    transformers 5 saves the CLIP tower as ``vision_tower.*``; the hub's checkpoints, and vLLM's
    loader, name it ``vision_tower.vision_model.*`` (vLLM refuses the former). transformers loads
    either. In place; other models are left as they are."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def renamed(key: str) -> str:
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + key[len("vision_tower."):]
        return key

    model_dir = Path(model_dir)
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            keys, meta = list(fh.keys()), fh.metadata()
            if all(renamed(k) == k for k in keys):
                continue
            tensors = {renamed(k): fh.get_tensor(k) for k in keys}
        save_file(tensors, str(f), metadata=meta)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2) + "\n")
