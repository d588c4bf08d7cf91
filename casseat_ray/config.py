"""One typed config tree for a whole run: YAML file + dotted command-line overrides.

Every section forbids unknown keys (a typo is an error, not a silently ignored knob), every
field carries a description (``casseat validate --explain`` prints them), and every error names
the dotted key, where it came from (the file or the command line) and what was expected.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem, one per line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def F(default: Any = ..., description: str = "", **kw: Any) -> Any:
    """A field that must explain itself."""
    if not description:
        raise TypeError("every config field needs a description")
    if isinstance(default, (list, dict)) or (isinstance(default, type) and issubclass(default, BaseModel)):
        factory = default if isinstance(default, type) else (lambda d=default: type(d)(d))
        return Field(default_factory=factory, description=description, **kw)
    return Field(default, description=description, **kw)


AnswerType = Literal["multi_choice", "integer", "float", "text", "list"]


# ---------------------------------------------------------------- source data
class FieldMap(Section):
    """Where the generic adapter finds each canonical field in a row of the user's file."""

    question: str = F("question", "Column holding the question text.")
    answer: str = F("answer", "Column holding the ground-truth answer.")
    image: str = F("image", "Column holding the image: a path (relative to image_root or absolute), raw bytes, base64 text or a Hugging Face {bytes, path} dict.")
    choices: str | None = F("choices", "Column holding the choices, as a list or as one delimited string such as 'A. 3;B. 4'. None when the data has no choices.")
    choices_delimiter: str = F(";", "Delimiter between choices when the choices column is one string.")
    answer_type: str | None = F(None, "Column stating the answer type (multi_choice|integer|float|text|list); inferred from the answer when absent.")
    precision: str | None = F(None, "Column stating the float precision (decimal places).")
    unit: str | None = F(None, "Column stating the answer's unit.")
    id: str | None = F(None, "Column with the source's own item id, carried as source_id into rejects, the SFT set, exports and evaluation items. None: the format's own id (MathVista pid, canonical source_id, else a column named id when there is one).")


class SourceConfig(Section):
    name: str = F(description="Source name recorded on every row (used in stats, caps and breakdowns).")
    format: Literal["canonical", "mathv360k", "mathvista", "mathv", "generic", "hf"] = F(
        description="Adapter: canonical (Parquet written by this project, e.g. make-demo-data), mathv360k, mathvista, mathv, generic (JSON/JSONL/Parquet/CSV with a field map), hf (Parquet/Arrow saved by Hugging Face datasets)."
    )
    path: Path = F(description="File or directory holding the annotations (or the Parquet files).")
    image_root: Path | None = F(None, "Directory that relative image paths are resolved against; defaults to the annotation file's directory.")
    split: str = F("train", "Split name recorded on every row.")
    fields: FieldMap = F(FieldMap, "Field map for the generic and hf adapters.")
    max_samples: int | None = F(None, "Read at most this many rows from the source (None: all).", ge=1)
    license: str | None = F(None, "License of the source, copied into the dataset card.")


class ImageConfig(Section):
    max_header_pixels: int = F(64_000_000, "Reject an image whose header declares more pixels than this, before decoding it (decompression bombs).", ge=1)
    min_side: int = F(28, "Reject images whose shorter side is below this many pixels.", ge=1)
    max_aspect_ratio: float = F(50.0, "Reject images whose long/short side ratio exceeds this (vision encoders fail on extreme strips).", gt=1)
    max_pixels: int = F(1_003_520, "Downscale (keeping aspect) images above this many pixels, so the teacher sees a bounded budget.", ge=1)
    format: Literal["auto", "PNG", "JPEG"] = F("auto", "Encoding of images that normalization changed (unchanged JPEG/PNG bytes are kept as they are); auto keeps JPEG sources JPEG and encodes everything else as PNG.")


class ModelFilterConfig(Section):
    enabled: bool = F(False, "Ask the student for a direct answer and drop items it already gets right (reason too_easy).")
    batch_size: int = F(32, "Rows per batch sent to the student engine.", ge=1)
    max_tokens: int = F(32, "Token budget of the student's direct answer.", ge=1)


class DDFSourceConfig(Section):
    dedup: bool = F(True, "Drop exact duplicates: same image content hash and same normalized question.")
    min_question_chars: int = F(1, "Reject questions shorter than this after stripping whitespace.", ge=0)
    max_question_chars: int = F(4000, "Reject questions longer than this (they would not fit the budget).", ge=1)
    max_answer_chars: int = F(64, "Reject free-form answers longer than this (not verifiable by rule).", ge=1)
    per_source_cap: dict[str, int] = F({}, "Keep at most N rows per source name.")
    budget: int | None = F(None, "Keep at most this many rows in total, sampled stratified by answer type and source.", ge=1)
    write_over_budget: bool = F(False, "Also write the rows the budget leaves out (over_budget) to rejects files; they are not quality rejects, and the funnel counts them either way.")
    model_filter: ModelFilterConfig = F(ModelFilterConfig, "Optional student-based filter (DDF level 1, model part).")


# ---------------------------------------------------------------- engines
class EngineConfig(Section):
    dtype: str = F("auto", "Weights dtype for vLLM (auto, bfloat16, float16, float32).")
    max_model_len: int = F(4096, "Context length the engine reserves per sequence.", ge=64)
    tensor_parallel_size: int = F(1, "GPUs one engine spans (tensor parallel).", ge=1)
    pipeline_parallel_size: int = F(1, "Pipeline stages one engine spans; the engine uses tensor x pipeline devices.", ge=1)
    distributed_executor_backend: Literal["uni", "mp", "ray"] | None = F(None, "How vLLM runs the engine (None: uni for one device, the model inside the engine process, on CPU too; ray for several devices, so that the workers live in the actor's placement group).")
    gpu_memory_utilization: float = F(0.9, "Share of GPU memory vLLM may take.", gt=0, le=1)
    kv_cache_memory_bytes: int | None = F(None, "Fixed KV-cache size in bytes (None: derived from gpu_memory_utilization). On CPU a fixed size also skips the start-up warm-up.", ge=1)
    enable_prefix_caching: bool = F(True, "Reuse the KV cache of a shared conversation prefix; makes the C2 turn cheap.")
    limit_mm_per_prompt: dict[str, int] = F({"image": 1}, "Maximum images (and videos) per prompt.")
    mm_processor_kwargs: dict[str, Any] | None = F(None, "Extra kwargs for the model's multimodal processor (e.g. max_pixels).")
    enable_lora: bool = F(False, "Allow LoRA adapters at generation time (needed to evaluate a trained student).")
    max_lora_rank: int = F(16, "Largest LoRA rank the engine accepts when enable_lora is on.", ge=1)
    max_num_seqs: int | None = F(None, "Concurrent sequences per engine step (None: vLLM's default).", ge=1)
    max_in_flight: int | None = F(None, "Rows one actor keeps in flight on its engine across Ray Data batches, each running its own cascade (None: the engine's max_num_seqs).", ge=1)
    request_timeout_s: float | None = F(None, "Seconds one request may take; a request still running then is aborted and fails its row as engine_error, which a rerun of the same command retries (None: no limit).", gt=0)
    backend: str | None = F(None, "The engine class, as 'package.module:Class' taking (model, engine config) and answering the casseat_ray.engines.Engine interface (None: vLLM).",
                            pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    enforce_eager: bool = F(False, "Disable CUDA graphs (faster start, slower steps).")
    seed: int = F(0, "Engine seed.")
    extra: dict[str, Any] = F({}, "Any other vllm.LLM keyword arguments, passed through unchanged.")

    @property
    def devices(self) -> int:
        """Devices one engine spans: tensor x pipeline."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


class SamplingConfig(Section):
    temperature: float = F(0.0, "Sampling temperature; 0 is greedy.", ge=0)
    top_p: float = F(1.0, "Nucleus sampling mass.", gt=0, le=1)
    max_tokens: int = F(1024, "New-token budget per turn (the method uses 1-2K; never as low as 128).", ge=1)
    n: int = F(1, "Completions per prompt.", ge=1)
    seed: int | None = F(0, "Per-request seed, for reproducible sampling (None: random); vLLM's CPU build runs sampled requests (temperature > 0) without it.")
    stop: list[str] = F([], "Extra stop strings.")
    choice: list[str] | None = F(None, "Constrain every completion to exactly one of these strings (vLLM structured outputs).")
    logprobs: int | None = F(None, "Return the log-probabilities of this many top candidates per generated token (None: none).", ge=0)


class PlacementConfig(Section):
    """How an engine spanning several devices is placed (one placement group per actor)."""

    bundle: dict[str, float] = F({"GPU": 1, "CPU": 1}, "Resources of each of the engine's tensor x pipeline bundles; the actor itself takes its CPUs from the first.")
    strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = F("STRICT_PACK", "Ray placement strategy for the bundles (STRICT_PACK keeps a tensor-parallel engine on one node; PACK lets pipeline stages span nodes).")
    accelerator_type: str | None = F(None, "Ray accelerator type every bundle must have (e.g. H100), None for any.")


def check_engine_placement(where: str, engine: EngineConfig, num_cpus: float, placement: PlacementConfig) -> None:
    """Refuse, before any work, an engine actor that could never be placed."""
    if engine.devices == 1:
        return
    if num_cpus > placement.bundle.get("CPU", 0):
        raise ValueError(f"{where}: the engine actor asks for {num_cpus} CPUs but a placement bundle holds "
                         f"{placement.bundle.get('CPU', 0)}; raise teacher.placement.bundle.CPU or lower num_cpus")
    if engine.distributed_executor_backend not in (None, "ray"):
        raise ValueError(f"{where}: distributed_executor_backend {engine.distributed_executor_backend!r} cannot use the actor's "
                         "placement group; use ray (or leave it unset) for an engine spanning several devices")


class TeacherConfig(Section):
    model: str = F(description="Teacher model: a local Hugging Face directory or a hub id.")
    engine: EngineConfig = F(EngineConfig, "vLLM engine arguments.")
    sampling: SamplingConfig = F(SamplingConfig, "Sampling for the C1 and C2 turns.")
    concurrency: int = F(1, "Number of teacher actors (each owns one engine).", ge=1)
    num_gpus: float = F(0.0, "GPUs per teacher actor for a one-device engine (1 on GPU clusters, 0 on CPU); an engine spanning several devices gets a placement group instead (see placement).", ge=0)
    num_cpus: float = F(1.0, "CPUs reserved per teacher actor.", ge=0)
    batch_size: int = F(16, "Rows per batch handed to one teacher actor.", ge=1)
    placement: PlacementConfig = F(PlacementConfig, "Placement group of an engine spanning several devices (engine.tensor_parallel_size x pipeline_parallel_size > 1).")


# ---------------------------------------------------------------- synthesis
class PromptsConfig(Section):
    c1: Path | None = F(None, "File overriding the C1 reasoning prompt (placeholder {{question}}).")
    c2: Path | None = F(None, "File overriding the C2 self-evaluation prompt.")
    c2_hint: Path | None = F(None, "File overriding the C2 prompt with a hidden ground-truth hint ({{answer}}).")
    seat: Path | None = F(None, "File overriding the single long SEAT prompt ({{question}}).")
    direct: Path | None = F(None, "File overriding the direct-answer prompt ({{question}}).")
    extract: Path | None = F(None, "File overriding the few-shot answer-extraction prompt ({{query}}, {{response}}).")
    judge: Path | None = F(None, "File overriding the model judge's prompt ({{question}}, {{answer}}, {{reasoning}}, {{evaluation}}).")


class SynthesisConfig(Section):
    mode: Literal["cascade", "seat", "cot"] = F("cascade", "cascade: C1 then C2 (Cas-SEAT); seat: one long prompt with inline self-evaluation; cot: C1 only (ablation).")
    prompts: PromptsConfig = F(PromptsConfig, "Prompt template overrides.")
    hint_ground_truth: bool = F(False, "Show the ground truth to the teacher in C2 as a hidden hint (mentions are filtered out).")
    cot_samples: int = F(1, "CoT samples per question from C1 (k > 1 feeds the AFT loss; needs temperature > 0).", ge=1)
    c2_after_unusable_c1: bool = F(False, "Run C2 even after a C1 that DDF level 2 rejects anyway (truncated, or without a final answer); off saves those teacher tokens (stats: teacher.c2_skipped).")
    max_error_share: float = F(0.1, "A run that loses more than this share of its questions to engine, stage or labeling errors fails (exit 1) instead of publishing what is left as a success.", ge=0, le=1)


class JudgeConfig(Section):
    enabled: bool = F(False, "Ask a judge model whether each kept sample's reflection is faithful to the image and the reasoning; unfaithful ones are rejected (stage ddf_judge).")
    model: str | None = F(None, "Judge model: a local Hugging Face directory or a hub id (None: the teacher's model, in an engine of its own).")
    engine: EngineConfig | None = F(None, "vLLM engine arguments of the judge (None: the teacher's).")
    constrained: bool = F(True, "Constrain the reply to the word faithful or unfaithful (vLLM structured outputs); false lets the judge reason first and reads its last 'Verdict:' line.")
    max_tokens: int = F(512, "Token budget of one judge reply (a constrained reply ends at its verdict word).", ge=1)
    on_no_verdict: Literal["reject", "keep"] = F("reject", "A reply without a verdict, or an engine error: reject the sample (judge_no_verdict, judge_error) or keep it.")
    concurrency: int = F(1, "Judge actors (each owns one engine).", ge=1)
    num_gpus: float = F(0.0, "GPUs per judge actor for a one-device engine (placement groups as for the teacher otherwise).", ge=0)
    num_cpus: float = F(1.0, "CPUs reserved per judge actor.", ge=0)
    batch_size: int = F(16, "Rows per batch handed to one judge actor.", ge=1)


class DDFLabeledConfig(Section):
    drop_truncated: bool = F(True, "Reject outputs that hit the token budget.")
    require_answer: bool = F(True, "Reject outputs without a final answer.")
    require_verdict: bool = F(True, "Reject self-evaluations with no verdict or more than one.")
    require_correct: bool = F(True, "Reject samples whose final answer is wrong.")
    require_consistent: bool = F(True, "Reject Accept after a wrong C1, Refine after a right C1, and Refine that does not fix.")
    leakage_phrases: list[str] = F(
        ["the expected answer", "the correct answer is given", "given answer", "private note", "i was told", "ground truth", "the hint"],
        "Case-insensitive phrases that reveal the hidden hint; a sample containing one is rejected.",
    )
    max_student_tokens: int = F(2048, "Reject samples longer than this in the student's tokens, image tokens included (never truncated).", ge=16)
    judge: JudgeConfig = F(JudgeConfig, "Optional model judge.")
    concurrency: int = F(1, "Labeling actors (each holds the student's processor to count sample lengths).", ge=1)
    num_cpus: float = F(0.5, "CPUs reserved per labeling actor.", gt=0)


class MixConfig(Section):
    self_eval_per_cot: float = F(1.0, "Self-evaluation samples per CoT sample, per kept question (Cas-SEAT default 1:1: every kept question gives its CoT and its self-evaluation sample); below 1 a seeded share of questions gives only its CoT sample, above 1 only its self-evaluation sample.", ge=0)
    keep_all_refine: bool = F(True, "Never leave out a Refine self-evaluation sample (the only kind that teaches correction) to meet the ratio.")
    max_samples: int | None = F(None, "Cap on the total SFT set size.", ge=1)
    seed: int = F(0, "Seed for choosing which samples fill the ratio.")


# ---------------------------------------------------------------- student
class LoraConfig(Section):
    r: int = F(8, "LoRA rank (size of the low-rank update).", ge=1)
    alpha: int = F(16, "LoRA alpha; the update is scaled by alpha / r.", ge=1)
    dropout: float = F(0.05, "Dropout on the input of each LoRA layer.", ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = F("all-linear", "Language-model modules to adapt; all-linear adapts every linear layer outside the vision tower.")
    freeze_vision: bool = F(True, "Keep the vision tower frozen.")
    train_projector: bool = F(False, "Train the vision-language projector (merger) fully.")


class StudentConfig(Section):
    model: str = F(description="Student model: a local Hugging Face directory or a hub id.")
    lora: LoraConfig = F(LoraConfig, "LoRA adapter settings.")
    engine: EngineConfig = F(EngineConfig, "vLLM engine arguments when the student generates (model filter, evaluation).")


class AFTConfig(Section):
    variant: Literal["detached", "boundary"] = F("boundary", "Constraint on the alignment term: detached stops gradients through negatives; boundary floors them at tau below the lowest positive.")
    tau: float = F(1.0, "Boundary margin for the boundary variant.", ge=0)
    weight: float = F(1.0, "Weight of the alignment term added to the token NLL.", ge=0)
    ranking: bool = F(False, "Use every better/worse pair of a ranked list instead of positives vs negatives.")
    samples: Literal["teacher", "student"] = F("teacher", "Whose answers the alignment term ranks. teacher: the teacher's C1 samples recorded by synthesis (synthesis.cot_samples > 1). student: as the AFT paper runs it, in two stages: stage 1 plain NLL fine-tuning, then the stage-1 student (its adapter on the student's vLLM engine: evaluate.engine or student.engine, evaluate.concurrency / num_cpus / num_gpus / batch_size) samples k answers per CoT or SEAT question, DDF's scorer ranks them, and stage 2 trains NLL + alignment starting from the stage-1 adapter.")
    k: int = F(4, "samples=student: answers the stage-1 student samples per question.", ge=2)
    temperature: float = F(1.0, "samples=student: sampling temperature of those answers.", gt=0)
    max_tokens: int = F(1024, "samples=student: new-token budget per sampled answer (one cut off at it ranks as no usable answer).", ge=1)
    stage1_epochs: float | None = F(None, "samples=student: passes over the SFT set in stage 1 (None: train.epochs); stage 2 runs train.epochs (train.max_steps caps each stage).", gt=0)


class TrainConfig(Section):
    epochs: float = F(3.0, "Passes over the SFT set.", gt=0)
    max_steps: int | None = F(None, "Stop after this many optimizer steps, whatever epochs says (None: epochs decide); the lr schedule spans the steps taken.", ge=1)
    init_adapter: str | None = F(None, "Start from this LoRA adapter's weights (a peft folder such as an earlier run's train/adapter) instead of a fresh LoRA; its rank and alpha must be student.lora's.")
    lr: float = F(1e-4, "Peak learning rate.", gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = F("cosine", "Learning-rate schedule after warmup.")
    warmup_ratio: float = F(0.1, "Share of steps spent warming up.", ge=0, lt=1)
    weight_decay: float = F(0.0, "AdamW weight decay.", ge=0)
    batch_size: int = F(4, "Samples per worker per micro-step.", ge=1)
    grad_accum: int = F(4, "Micro-steps per optimizer step.", ge=1)
    max_grad_norm: float = F(1.0, "Gradient clipping norm (0 disables).", ge=0)
    cutoff_len: int = F(2048, "Samples longer than this many tokens are dropped and counted, never truncated.", ge=16)
    label_mode: Literal["all_assistant", "last_assistant"] = F("last_assistant", "Which assistant turns carry loss; self-evaluation samples always train on the last turn only.")
    packing: bool = F(False, "Pack several samples into each row of up to cutoff_len tokens (each attends only to itself) instead of padding; batch_size then counts packed rows.")
    shuffle_window: int = F(1024, "Samples per shuffle window: the SFT set is cut into windows in read order and every epoch shuffles each window's samples (packed rows) by (seed, epoch); a worker holds about window / num_workers encoded samples, pixels included, so lower it for large images.", ge=1)
    data_cpus: float = F(1.0, "CPUs each Ray Data task that reads and encodes the SFT set reserves (the image processor runs there, while the workers train); 0 lets them share CPUs the workers hold.", ge=0)
    encoded_cache_gb: float = F(8.0, "Each worker keeps its encoded samples (pixels included) on its local disk (the temp directory) after its first whole pass, up to this many GB, and reads later epochs back from there instead of encoding them again; a worker whose samples outgrow it encodes every epoch. 0: encode every epoch.", ge=0)
    precision: Literal["auto", "bf16", "fp32"] = F("auto", "auto: bf16 on GPU, fp32 on CPU.")
    gradient_checkpointing: bool = F(False, "Trade compute for memory.")
    compile: bool = F(False, "Compile each transformer block of the student (decoder layers and vision blocks) with torch.compile, and its token loss: the blocks of a kind share their compiled code (regional compilation), their elementwise work (norms, activations, LoRA's scaling and adds, dropout) runs in fused kernels, and the loss reads the half-precision logits without an fp32 copy. The first steps pay the compilation (once for the first shape, once more when lengths vary).")
    strategy: Literal["ddp", "fsdp"] = F("ddp", "ddp: every worker holds the whole student; fsdp: parameters, gradients and optimizer state are sharded across the workers per transformer block (FSDP2; gloo on CPU, NCCL on GPU), for students that do not fit one device.")
    num_workers: int = F(1, "Ray Train workers.", ge=0)
    use_gpu: bool = F(False, "One GPU per worker.")
    cpus_per_worker: float = F(1.0, "CPUs per worker.", gt=0)
    log_every: int = F(10, "Optimizer steps between console lines (metrics.jsonl gets every step).", ge=1)
    checkpoint_every: int = F(50, "Optimizer steps between checkpoints.", ge=1)
    keep_checkpoints: int = F(2, "Checkpoints kept on storage.", ge=1)
    max_failures: int = F(0, "Worker-group restarts Ray Train attempts after a failure.", ge=-1)
    nonfinite: Literal["skip", "stop"] = F("skip", "On a non-finite loss: skip the step and count it, or stop the run.")
    loss: Literal["nll", "aft"] = F("nll", "nll: token cross-entropy; aft: NLL plus the constrained alignment loss.")
    aft: AFTConfig = F(AFTConfig, "AFT alignment loss settings.")
    seed: int = F(0, "Seed for init, data order and dropout.")


# ---------------------------------------------------------------- evaluation
class BenchmarkConfig(SourceConfig):
    """A benchmark: a source read without DDF filtering, plus how its answers are scored."""

    split: str = F("test", "Split name recorded on every item.")
    protocol: Literal["math", "mathv", "mathvista"] = F("math", "Scoring protocol: math (letters or values, free-form answers compared mathematically), mathv (MATH-V's own rule), mathvista (MathVista's: nearest choice by edit distance, exact strings).")


class EvaluateConfig(Section):
    benchmarks: list[BenchmarkConfig] = F([], "Benchmarks to score the student on (same adapters as sources, read without DDF filtering).")
    models: list[Literal["base", "tuned", "teacher"]] = F(["base", "tuned"], "Models to evaluate on the same items: base (the student), tuned (the student with the LoRA adapter), teacher (its own engine).")
    modes: list[Literal["direct", "cot", "seat", "cascade", "best_of_n"]] = F(["direct", "cot", "cascade"], "Inference modes to compare (cascade runs pass 2 on every item).")
    best_of_n: int = F(4, "Samples per question for best_of_n.", ge=1)
    best_of_n_temperature: float = F(0.7, "Sampling temperature of best_of_n's C1 samples (its C2 checks are greedy).", ge=0)
    adapter: Path | None = F(None, "LoRA adapter to evaluate as 'tuned' (None: the adapter this run trained, OUTPUT_DIR/NAME/train/adapter).")
    sampling: SamplingConfig = F(SamplingConfig, "Sampling for evaluation passes (greedy by default).")
    model_extractor: bool = F(False, "Send a reply no rule parses to MathVista's few-shot answer extractor (synthesis.prompts.extract), answered by the model that wrote the reply, and score its extraction; items.parquet's extracted_by says which answers it gave.")
    engine: EngineConfig | None = F(None, "vLLM engine arguments for the student (None: student.engine); LoRA is switched on for 'tuned'.")
    concurrency: int = F(1, "Student engine actors.", ge=1)
    batch_size: int = F(64, "Items per batch handed to one engine actor (an actor keeps several batches in flight; Ray Data spends about 0.2 s per batch on a small machine, so small batches cost throughput).", ge=1)
    num_cpus: float = F(1.0, "CPUs per engine actor.", ge=0)
    num_gpus: float = F(0.0, "GPUs per engine actor (1 on GPU clusters).", ge=0)
    bootstrap: int = F(1000, "Bootstrap resamples for the 95% intervals.", ge=100)
    seed: int = F(0, "Seed of the bootstrap and of best_of_n sampling.")


# ---------------------------------------------------------------- ray + root
class RayConfig(Section):
    address: str | None = F(None, "Ray cluster address ('auto' inside a cluster; None starts local Ray).")
    num_cpus: int | None = F(None, "CPUs for a local Ray started by this run (None: all).", ge=1)
    storage_path: str = F("runs/ray", "Ray Train checkpoints: a path all nodes see (NFS) or a URI (s3://bucket/ckpt, gs://...; "
                                      "S3-compatible stores: s3://bucket/ckpt?endpoint_override=host:9000&scheme=http).")
    actor_init_retries: int = F(2, "Times an engine actor whose start fails (its constructor raises, or its process dies while starting) "
                                   "is tried again before the run fails with that error; a start that fails every time ends the run "
                                   "after this many retries.", ge=0)


class Config(Section):
    name: str = F("casseat", "Run name: names the output folder and the Ray Train run.", pattern=r"^[A-Za-z0-9._-]+$")
    output_dir: str = F("out", "Root of all outputs; this run writes under output_dir/name. A local path or a URI "
                               "(s3://bucket/runs, gs://...): a URI is mirrored from a local staging folder.")
    seed: int = F(0, "Global seed.")
    sources: list[SourceConfig] = F([], "Source datasets to synthesize from.")
    images: ImageConfig = F(ImageConfig, "Image validation and normalization.")
    ddf_source: DDFSourceConfig = F(DDFSourceConfig, "DDF level 1: source filtering before any teacher call.")
    teacher: TeacherConfig | None = F(None, "Teacher model and engine.")
    synthesis: SynthesisConfig = F(SynthesisConfig, "Cascade / SEAT / CoT mode and prompts.")
    ddf_labeled: DDFLabeledConfig = F(DDFLabeledConfig, "DDF level 2: filtering of the teacher's outputs.")
    mix: MixConfig = F(MixConfig, "Mixing CoT and self-evaluation samples.")
    student: StudentConfig | None = F(None, "Student model and LoRA.")
    train: TrainConfig = F(TrainConfig, "Student fine-tuning on Ray Train.")
    evaluate: EvaluateConfig = F(EvaluateConfig, "Evaluation of the student.")
    ray: RayConfig = F(RayConfig, "Ray connection and storage.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sources: names must be unique, repeated: {dupes}")
        unknown = sorted(set(self.ddf_source.per_source_cap) - set(names))
        if unknown and self.sources:
            raise ValueError(f"ddf_source.per_source_cap names unknown sources {unknown}; sources are {names}")
        if self.teacher:
            check_engine_placement("teacher", self.teacher.engine, self.teacher.num_cpus, self.teacher.placement)
            if self.student and self.ddf_source.model_filter.enabled:
                check_engine_placement("student (model filter)", self.student.engine, self.teacher.num_cpus, self.teacher.placement)
            if self.ddf_labeled.judge.enabled:
                check_engine_placement("ddf_labeled.judge", self.judge_engine, self.ddf_labeled.judge.num_cpus, self.teacher.placement)
        if self.train.packing and self.train.loss == "aft":
            raise ValueError("train.packing cannot be combined with train.loss=aft: AFT scores each response as its own row")
        if self.train.compile and self.train.strategy == "fsdp":
            raise ValueError("train.compile cannot be combined with train.strategy=fsdp: FSDP's hooks on every layer would run "
                             "inside the compiled layers; use strategy ddp with compile, or fsdp without it")
        e = self.evaluate
        if "best_of_n" in e.modes and e.best_of_n > 1 and e.best_of_n_temperature == 0:
            raise ValueError("evaluate.best_of_n > 1 needs evaluate.best_of_n_temperature > 0 (greedy samples are identical)")
        if self.synthesis.cot_samples > 1 and self.teacher and self.teacher.sampling.temperature == 0:
            raise ValueError("synthesis.cot_samples > 1 needs teacher.sampling.temperature > 0 (greedy samples are identical)")
        return self

    @property
    def run_dir(self) -> Path:
        """The local folder the run writes in: output_dir/name, or its staging mirror for a URI."""
        from casseat_ray import storage

        if storage.is_uri(self.output_dir):
            return storage.staging_dir(self.output_dir) / self.name
        return Path(self.output_dir).expanduser() / self.name

    @property
    def run_uri(self) -> str | None:
        """output_dir/name when output_dir is a URI (the outputs' real home), else None."""
        from casseat_ray import storage

        return storage.join(self.output_dir, self.name) if storage.is_uri(self.output_dir) else None

    # The judge falls back to the teacher's model and engine arguments.
    @property
    def judge_model(self) -> str:
        return self.ddf_labeled.judge.model or self.teacher.model

    @property
    def judge_engine(self) -> EngineConfig:
        return self.ddf_labeled.judge.engine or self.teacher.engine


# ---------------------------------------------------------------- loading
def _format_loc(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(str(p))
        elif p in ("function-after",) or str(p).startswith(("function-", "literal[", "list[", "dict[")):
            continue
        else:
            parts.append(str(p))
    return ".".join(parts) or "(root)"


def _describe(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; `casseat validate --explain` lists the keys)"
    if kind == "missing":
        return "required key is missing"
    got = err.get("input")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        return f"{msg[0].lower() + msg[1:]}, got {got!r}"
    return msg


def format_errors(exc: ValidationError, origin: str, overrides: list[str] = ()) -> str:
    """One line per error, blamed on the override that set the key, else on the file."""
    set_by = {o.split("=", 1)[0].strip(): o for o in overrides}
    lines = []
    for err in exc.errors():
        key = _format_loc(err["loc"])
        blame = next((f"command line ({o})" for k, o in set_by.items() if key == k or key.startswith(k + ".")), origin)
        lines.append(f"{blame}: {key}: {_describe(err)}")
    return "\n".join(lines)


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, dotted: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict; list items by index."""
    if "=" not in dotted:
        raise ConfigError(f"command line: override {dotted!r} must look like key.sub=value")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"command line: override {dotted!r} has an empty key part")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                owner = ".".join(parts[:i])
                raise ConfigError(f"command line: {key}: {owner} is a list of {len(node)}; use an index below it")
            node = node[int(part)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"command line: {key}: {here} is a value, not a section")
    last = parts[-1]
    value = _parse_scalar(raw)
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"command line: {key}: index {last} out of range for a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config, apply dotted overrides, validate.

    Relative paths in the file are taken relative to the current working directory (the
    directory ``casseat`` or ``ray job submit`` runs in), so the same file works locally and
    as a job's working_dir.
    """
    origin = "command line"
    tree: dict = {}
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for o in overrides:
        apply_override(tree, o)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_errors(e, origin, list(overrides))) from None


_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def is_hub_id(ref: str) -> bool:
    """``name`` or ``namespace/name`` as the Hugging Face hub spells a repository."""
    return bool(_HUB_ID.match(ref)) and ".." not in ref and "--" not in ref and not ref.endswith((".", "-"))


_PATH_FORMS = ("/", "./", "../", "~")  # how a model reference says it is a path


def _looks_local(ref: str) -> bool:
    """A model reference meant as a folder: a path form, an existing path, or anything the hub
    could not name (``out/tiny/models/teachr`` is a mistyped folder, not a hub id)."""
    return ref.startswith(_PATH_FORMS) or os.path.exists(ref) or not is_hub_id(ref)


def with_absolute_models(cfg: Config) -> Config:
    """``cfg`` with local model directories made absolute (hub ids untouched): Ray Train runs
    each worker in a directory of its own, where a relative path would point nowhere."""
    cfg = cfg.model_copy(deep=True)
    for section in (cfg.teacher, cfg.student):
        if section is not None and os.path.isdir(os.path.expanduser(section.model)):
            section.model = str(Path(section.model).expanduser().resolve())
    if cfg.train.init_adapter:
        cfg.train.init_adapter = str(Path(cfg.train.init_adapter).expanduser().resolve())
    return cfg


INPUT_PARTS = ("sources", "teacher", "student", "evaluate")


def check_inputs(cfg: Config, parts: tuple[str, ...] = INPUT_PARTS) -> list[str]:
    """Paths that must exist before expensive work starts; returns one message per problem."""
    problems: list[str] = []

    def need(key: str, p: Path | str | None, what: str, is_dir: bool | None = None) -> None:
        if p is None:
            return
        p = Path(p).expanduser()
        if not p.exists():
            problems.append(f"{key}: {what} not found: {p}")
        elif is_dir is True and not p.is_dir():
            problems.append(f"{key}: expected a directory: {p}")

    if "sources" in parts:
        for i, s in enumerate(cfg.sources):
            need(f"sources.{i}.path", s.path, "source data")
            need(f"sources.{i}.image_root", s.image_root, "image root", is_dir=True)
    if "evaluate" in parts:
        for i, s in enumerate(cfg.evaluate.benchmarks):
            need(f"evaluate.benchmarks.{i}.path", s.path, "benchmark data")
            need(f"evaluate.benchmarks.{i}.image_root", s.image_root, "image root", is_dir=True)
        need("evaluate.adapter", cfg.evaluate.adapter, "adapter", is_dir=True)
    for role in ("teacher", "student"):
        section = getattr(cfg, role)
        if role in parts and section is not None and _looks_local(section.model):
            before = len(problems)
            need(f"{role}.model", section.model, "model directory", is_dir=True)
            if len(problems) > before and not is_hub_id(section.model) and not section.model.startswith(_PATH_FORMS):
                problems[-1] += " (nor is it a hub id such as Qwen/Qwen2-VL-2B-Instruct)"
    if "student" in parts:
        need("train.init_adapter", cfg.train.init_adapter, "adapter", is_dir=True)
    judge = cfg.ddf_labeled.judge
    if "teacher" in parts and judge.enabled and judge.model and _looks_local(judge.model):
        need("ddf_labeled.judge.model", judge.model, "model directory", is_dir=True)
    for key, p in (("synthesis.prompts." + k, v) for k, v in cfg.synthesis.prompts):
        need(key, p, "prompt file")
    engines = [(f"{r}.engine", getattr(cfg, r).engine) for r in ("teacher", "student") if r in parts and getattr(cfg, r) is not None]
    if "teacher" in parts and judge.enabled and judge.engine is not None:
        engines.append(("ddf_labeled.judge.engine", judge.engine))
    if "evaluate" in parts and cfg.evaluate.engine is not None:
        engines.append(("evaluate.engine", cfg.evaluate.engine))
    for key, engine in engines:
        module = engine.backend.split(":")[0] if engine.backend else None
        try:
            found = module is None or importlib.util.find_spec(module) is not None
        except ImportError:  # a missing parent package
            found = False
        if not found:
            problems.append(f"{key}.backend: module not found: {module}")
    return problems


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def explain(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per key: dotted name, default, description (the config reference)."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is None:
            for arg in getattr(ann, "__args__", ()):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    sub = arg
        if sub is not None:
            is_list = str(ann).startswith("list")
            lines.append(f"{key}: {field.description}" + (" (a list; one entry:)" if is_list else ""))
            lines.extend(explain(sub, key + (".N." if is_list else ".")))
        else:
            default = field.get_default(call_default_factory=True)
            shown = "(required)" if field.is_required() else repr(default if not isinstance(default, Path) else str(default))
            lines.append(f"{key} = {shown}: {field.description}")
    return lines
