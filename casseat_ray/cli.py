"""The ``casseat`` command. Every subcommand here works end to end; ``--help`` on each explains it.

Exit codes: 0 success, 1 the run failed, 2 bad usage or bad config (nothing expensive started).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

MAIN_HELP = """\
casseat runs Cascaded Self-Evaluation Augmented Training (Cas-SEAT) on Ray: a teacher
vision-language model answers your image questions step by step (C1), checks its own answer
in a second turn (C2), the results are filtered (Double-level Data Filtering) and mixed into a
supervised fine-tuning set for a small student.

Start here:
  casseat demo                          whole pipeline on tiny models and generated data (CPU)
  casseat run --config C                synthesize -> train -> evaluate, one resumable run
  casseat validate CONFIG [key=value]   check a config and print it resolved
  casseat validate --explain            every config key with its default and meaning
"""

DEMO_HELP = """\
Runs the whole pipeline on the shipped tiny config (jobs/configs/tiny-cpu.yaml) on local Ray,
on CPU, from scratch: builds a tiny teacher and a tiny student (real Qwen2-VL architecture,
built offline), draws demo questions and held-out demo questions with PIL, then

  1. synthesis: the teacher cascade on a vLLM actor -- C1 (reason step by step) then C2
     (self-evaluate, a second user turn on the same conversation) -- DDF level 2, the mix;
  2. training: the student's LoRA adapter on Ray Train;
  3. evaluation: base and tuned student on the held-out questions, direct, CoT and cascade
     (pass 2 on every item), both served by one vLLM engine;

and prints the summary. Writes under OUT:

  models/teacher, models/student   the tiny models (Hugging Face format; reused when unchanged)
  data/, heldout/                  the demo questions (canonical Parquet, images embedded)
  config.yaml                      the run's config (usable with casseat run / synthesize / ...)
  tiny-cpu/                        the run: sft/, stats.json, funnel.png, train/ (adapter,
                                   loss.png), eval/ (report.md, accuracy.png, ...), summary.json
  summary.json                     funnel per stage, final training loss, accuracy per model and
                                   mode, wall time per step (also printed)

What it shows and does not: the tiny teacher is trained, when built, on scripted solutions
of the demo's task family -- including these very questions, with deliberate mistakes left in
so that C2 has something to Refine -- so the funnel keeps a real share of them. It stands in
for a large teacher; it does not show that a teacher generalizes. The student is tiny and
starts from nothing, so its accuracy says nothing about the method; the demo shows the
machinery end to end. Takes a few minutes on a laptop CPU.
"""


def _config_args(p: argparse.ArgumentParser, option: bool = False) -> None:
    """The config file (positional, or a required ``--config`` when ``option``) and its dotted overrides."""
    if option:
        p.add_argument("--config", type=Path, required=True, help="YAML config file")
    else:
        p.add_argument("config", nargs="?", type=Path, help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides applied after the file, values parsed as YAML (e.g. train.lr=2e-4 sources.0.max_samples=100)")


def _load(args) -> "object":
    from casseat_ray.config import load_config

    return load_config(args.config, args.overrides)


def cmd_validate(args) -> int:
    from casseat_ray.config import INPUT_PARTS, explain, to_yaml

    if args.explain:
        print("\n".join(explain()))
        return EXIT_OK
    if args.config_option is not None:  # `--config C`, as every other command takes it
        if args.config is not None:
            args.overrides.insert(0, str(args.config))  # then the positional was the first override
        args.config = args.config_option
    if args.config is None:
        print("casseat validate: give a CONFIG file (or --explain)", file=sys.stderr)
        return EXIT_USAGE
    cfg = _load_checked(args, () if args.no_check_paths else INPUT_PARTS)
    if cfg is None:
        return EXIT_USAGE
    if args.cluster:
        return _check_cluster(cfg, args.cluster)
    print(to_yaml(cfg), end="")
    return EXIT_OK


def _check_cluster(cfg, path: Path) -> int:
    from casseat_ray import cluster

    if not path.is_file():
        print(f"--cluster: {path}: file not found", file=sys.stderr)
        return EXIT_USAGE
    try:
        spec = cluster.load_cluster(path)
    except Exception as e:  # the schema's own message names the key
        print(f"{path}: not a valid Ray cluster config: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    problems, fits = cluster.check_fit(cfg, spec)
    for line in fits:
        print(f"ok    {line}")
    for line in problems:
        print(f"FAILS {line}", file=sys.stderr)
    return EXIT_USAGE if problems else EXIT_OK


def cmd_make_tiny(args) -> int:
    from casseat_ray.tiny import fingerprint, make_tiny

    if args.format_steps is not None and args.format_steps < 0:
        print(f"casseat make-tiny: --format-steps must be 0 or more, got {args.format_steps}", file=sys.stderr)
        return EXIT_USAGE
    path = make_tiny(args.out, role=args.role, seed=args.seed, format_steps=args.format_steps, family=args.family)
    print(f"tiny {args.family} {args.role} written to {path} (fingerprint {fingerprint(path)[:12]})")
    return EXIT_OK


def cmd_make_demo_data(args) -> int:
    from casseat_ray.demo_data import make_demo_data

    if args.n < 1:
        print(f"casseat make-demo-data: --n must be at least 1, got {args.n}", file=sys.stderr)
        return EXIT_USAGE
    path = make_demo_data(args.out, n=args.n, seed=args.seed)
    print(f"{args.n} demo questions written to {path}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from casseat_ray import demo

    from casseat_ray.run import StepFailed

    if args.n < 1 or args.heldout < 1:
        print(f"casseat demo: --n and --heldout must be at least 1, got {args.n} and {args.heldout}", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = demo.run(args.out, n=args.n, heldout=args.heldout, overrides=args.overrides, progress=not args.no_progress)
    except StepFailed as e:
        print(str(e), file=sys.stderr)
        return EXIT_FAIL
    print("\n" + format_run_summary(summary))
    print(f"\nsummary: {args.out / 'summary.json'}; plots: funnel.png, train/loss.png, eval/accuracy.png under {summary['outputs']}")
    return EXIT_OK


def _load_checked(args, parts: tuple[str, ...], writes: bool = False):
    """The config, or None after printing every problem (bad keys, missing inputs, and for a
    command that ``writes``, outputs a Ray job would lose)."""
    from casseat_ray.config import ConfigError, check_inputs
    from casseat_ray.runtime import job_output_problems

    try:
        cfg = _load(args)
    except ConfigError as e:
        print(f"config errors:\n{e}", file=sys.stderr)
        return None
    problems = check_inputs(cfg, parts) + (job_output_problems(cfg) if writes else [])
    if problems:
        print("config errors:\n" + "\n".join(f"{args.config or 'command line'}: {p}" for p in problems), file=sys.stderr)
        return None
    return cfg


def _stage_lines(stages: dict) -> list[str]:
    """The funnel table: one line per stage with its in/out counts and reject reasons
    (``{name: {"in", "out", "rejected": {reason: n}}}``, as stats.json and data inspect have it)."""
    lines = ["stage          in      out  rejected by reason"]
    for name, st in stages.items():
        reasons = ", ".join(f"{k} {v}" for k, v in st["rejected"].items()) or "-"
        lines.append(f"{name:<11} {st['in']:>6} {st['out']:>8}  {reasons}")
    return lines


def _print_stages(stages: dict) -> None:
    print("\n".join(_stage_lines(stages)))


def format_run_summary(s: dict) -> str:
    """A run's summary.json as the console shows it."""
    from casseat_ray.inference.modes import MODES

    stages = {name: {"in": st["in"], "out": st["out"], "rejected": st["by_reason"]} for name, st in s["funnel"].items()}
    lines = [f"run {s['name']}: outputs in {s['outputs']}", "", "synthesis funnel:", *_stage_lines(stages)]
    by_kind = ", ".join(f"{k} {v}" for k, v in s["sft"]["by_kind"].items()) or "none"
    lines += ["", f"kept {s['kept']} of {s['questions']} questions; SFT set: {s['sft']['samples']} samples ({by_kind})"]
    t = s["train"]
    loss = "n/a" if t["final_loss"] is None else f"{t['first_loss']:.3f} -> {t['final_loss']:.3f}"
    lines += [f"training: {t['steps']} steps on {t['samples']} samples, loss {loss}; adapter {t['adapter']}", "", "evaluation accuracy (95% CI):"]
    modes = [m for m in MODES if any(m in per for per in s["eval"].values())]
    lines.append("model    " + "".join(f"{m:>22}" for m in modes))
    for model, per in s["eval"].items():
        cells = []
        for m in modes:
            c = per.get(m)
            ci = f" [{c['ci95'][0]:.2f},{c['ci95'][1]:.2f}]" if c and c.get("ci95") else ""
            cells.append(f"{'-' if c is None else format(c['accuracy'], '.3f') + ci:>22}")
        lines.append(f"{model:<9}" + "".join(cells))
    lines += ["", "wall time: " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in s["steps"].items()) + f"; total {s['wall_seconds']:.0f}s"]
    return "\n".join(lines)


def _print_funnel(f: dict) -> None:
    print(f"rows in: {f['in']}   accepted: {f['accepted']}   rejected: {f['in'] - f['accepted']}\n")
    _print_stages(f["stages"])
    print("\nby source:      " + ", ".join(f"{k}: {v.get('accepted', 0)} accepted / {v.get('rejected', 0)} rejected" for k, v in f["by_source"].items()))
    print("by answer type: " + (", ".join(f"{k} {v}" for k, v in f["by_answer_type"].items()) or "-"))


def cmd_data_inspect(args) -> int:
    import json as _json

    from casseat_ray import data
    from casseat_ray.runtime import init_ray

    cfg = _load_checked(args, ("sources",))
    if cfg is None:
        return EXIT_USAGE
    if not cfg.sources:
        print(f"{args.config}: sources: no sources configured", file=sys.stderr)
        return EXIT_USAGE
    init_ray(cfg.ray)
    ds = data.load(cfg)
    if args.rejects:
        ds = ds.materialize()  # counted and written from one execution
        n = data.write_rejects(ds, args.rejects, cfg.ddf_source.write_over_budget)
        print(f"{n} rejects written to {args.rejects}", file=sys.stderr)
    f = data.funnel(ds)
    if args.json:
        print(_json.dumps({k: f[k] for k in ("in", "accepted", "rejected", "by_source", "by_answer_type", "stages")}))
    else:
        _print_funnel(f)
    if args.show:
        _preview(cfg, ds, args.show, sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def _preview(cfg, ds, n: int, out) -> None:
    from casseat_ray.inference.turns import run_prompts
    from casseat_ray.preview import show_rows

    rows = ds.filter(lambda r: r["reject_reason"] is None).take(n)
    processor = None
    if cfg.student is not None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(cfg.student.model)
    print(f"\n{len(rows)} accepted rows as the teacher sees them" + ("" if processor else " (no student configured: no token counts)") + ":\n", file=out)
    print(show_rows(rows, run_prompts(cfg)["c1"], processor), file=out)


SYNTH_HELP = """\
Run the synthesis job: stream the configured sources through the DDF level-1 rules, the
optional student filter (too_easy), the teacher cascade on vLLM actors (C1 reasoning, then C2
self-evaluation on the same conversation; or SEAT / CoT-only per synthesis.mode), DDF level 2
(format, verdict, correctness, consistency, leakage, student-token length) and the mix of CoT
and self-evaluation samples. Writes under OUTPUT_DIR/NAME:

  sft/*.parquet       the SFT set: messages + images + provenance
  rejects.parquet     every dropped row with its stage, reason and detail
  stats.json          funnel per stage, teacher tokens, rows/s, wall time
  README.md           dataset card;  funnel.png  the funnel as a chart
  config.yaml         the resolved config
  export/             LLaMA-Factory (sharegpt + dataset_info.json) and ms-swift JSONL copies
  work/               finished teacher outputs, one part file per block

Stopping (Ctrl-C, a killed driver, a lost node) loses only the blocks in flight: rerun the
same command and it continues where it stopped, without duplicates. Questions that failed
with an engine error or ran past teacher.engine.request_timeout_s are sent again by the same
rerun; nothing else is redone. A rerun with a changed config is refused unless --fresh is given.
"""


def cmd_synthesize(args) -> int:
    from casseat_ray.synth import pipeline

    cfg = _load_checked(args, ("sources", "teacher", "student"), writes=True)
    if cfg is None:
        return EXIT_USAGE
    missing = [k for k in ("teacher", "student") if getattr(cfg, k) is None]
    if not cfg.sources or missing:
        what = (["sources"] if not cfg.sources else []) + [f"{k}.model" for k in missing]
        print(f"config errors:\n{args.config}: synthesize needs {', '.join(what)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        stats = pipeline.run(cfg, fresh=args.fresh, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished blocks are kept in {cfg.run_dir / 'work'}; rerun the same command to resume", file=sys.stderr)
        return 130
    if not stats.get("stages"):
        print(f"stopped early: {stats}", file=sys.stderr)
        return EXIT_FAIL
    _print_funnel_stats(stats)
    print(f"\nSFT set: {stats['sft']['samples']} samples ({', '.join(f'{k} {v}' for k, v in stats['sft']['by_kind'].items()) or 'none'}) in {cfg.run_dir / 'sft'}")
    if stats.get("rows_retryable"):
        print(f"{stats['rows_retryable']} question(s) failed with engine errors or timeouts; rerun the same command to retry only those",
              file=sys.stderr)
    if stats.get("failed"):
        print(f"synthesis failed: {stats['failed']}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _print_funnel_stats(stats: dict) -> None:
    _print_stages(stats["stages"])
    t = stats["teacher"]
    rate = f"{stats['rows_per_s']} rows/s" if stats.get("rows_per_s") else "nothing new to run"
    print(f"\nteacher: {t['rows']} questions, {t['tokens_in']} tokens in, {t['tokens_out']} out; {rate}; wall {stats['wall_seconds']:.0f}s")


TRAIN_HELP = """\
Fine-tune the student with LoRA on Ray Train (TorchTrainer), on the SFT set the synthesis job
wrote (OUTPUT_DIR/NAME/sft, or --data). Each worker encodes samples with the student's own
processor and chat template: loss only on assistant turns (the last turn only for
self-evaluation samples), image tokens never cut, samples over train.cutoff_len dropped and
counted. The data order is fixed by (train.seed, epoch), so a resumed run replays exactly
what an uninterrupted one does. Writes under OUTPUT_DIR/NAME/train:

  adapter/          the LoRA adapter in peft format (+ processor); vLLM loads it with enable_lora
  metrics.jsonl     loss, lr, grad norm, tokens/s, samples/s per step (printed every train.log_every)
  loss.png          the loss curve;  summary.json  steps, samples, dropped, workers

Checkpoints (adapter, optimizer, scheduler, step) go to RAY.STORAGE_PATH/NAME every
train.checkpoint_every steps. A killed run continues with --resume, from the newest complete
checkpoint (a torn one, cut short by the kill or a full disk, is passed over, and the log says
so); reusing a name that has checkpoints without --resume is refused.

train.loss=aft adds AFT's alignment term (right answers scored above wrong ones). With
train.aft.samples=teacher it ranks the teacher's C1 samples the SFT set carries; with
train.aft.samples=student it runs as the AFT paper does, in three resumable steps:
  1. stage 1: plain NLL fine-tuning (Ray Train run NAME-aft-stage1, outputs in train/stage1/);
  2. the stage-1 student samples train.aft.k answers per CoT/SEAT question on vLLM with its
     adapter; DDF's scorer ranks them (parts in train/aft_samples/, the SFT set with the
     student's answers in train/aft_sft/);
  3. stage 2: NLL + alignment from the stage-1 adapter (train/adapter, as any run).
summary.json's "aft" says which answers were ranked, with the sampling's figures.
"""

EXPORT_HELP = """\
Check the trained adapter (peft format, OUTPUT_DIR/NAME/train/adapter or --adapter) and, with
--merged OUT, write the student with the adapter merged into its weights as a plain Hugging
Face model (plus processor) that any runtime can load without peft.
"""


def cmd_train(args) -> int:
    from casseat_ray.train import run as train_run

    cfg = _load_checked(args, ("student",), writes=True)
    if cfg is None:
        return EXIT_USAGE
    try:
        summary = train_run.run(cfg, resume=args.resume, data=args.data, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun with --resume to continue from the last checkpoint in {cfg.ray.storage_path}", file=sys.stderr)
        return 130
    except train_run.TrainingFailed as e:  # the workers' own traceback is above, in their output
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAIL
    print(f"trained {summary['steps']} steps on {summary['samples']} samples "
          f"({summary['dropped_too_long']} too long, {summary['dropped_no_labels']} without labels and {summary['dropped_malformed']} "
          f"malformed dropped; {summary['skipped_nonfinite']} non-finite steps skipped); adapter: {summary['adapter']}")
    sampled = summary.get("aft", {}).get("sampling")
    if sampled:
        print(f"AFT on the student's own answers: stage 1 {summary['aft']['stage1']['steps']} steps; {sampled['answers']} answers to "
              f"{sampled['questions']} questions ({sampled['right']} right, {sampled['wrong']} wrong, {sampled['unusable']} unusable), "
              f"{summary.get('aft_questions', 0)} questions with a better and a worse answer in stage 2")
        failed = sum(sampled["failed"].values())
        if failed:
            print(f"{failed} question(s) could not be sampled ({sampled['failed']}): stage 2 trained them without the alignment term",
                  file=sys.stderr)
    return EXIT_OK


def cmd_export(args) -> int:
    from casseat_ray.train import run as train_run

    cfg = _load_checked(args, ("student",))
    if cfg is None:
        return EXIT_USAGE
    out = train_run.export(cfg, adapter=args.adapter, merged=args.merged)
    print("\n".join(f"{k}: {v}" for k, v in out.items()))
    return EXIT_OK


EVALUATE_HELP = """\
Score the student on benchmarks the way the method prescribes, before and after fine-tuning,
in one run on the same items. The benchmarks (evaluate.benchmarks: MATH-V, MathVista, any
mapped dataset) are read and validated but never DDF-filtered; items that cannot be read (a
MathVista item without its image) are counted, not scored. Models (evaluate.models): base
(the student), tuned (the student with the LoRA adapter this run trained, or
evaluate.adapter; both served by one vLLM engine), teacher (its own engine). Modes
(evaluate.modes): direct, cot (C1), seat (one long prompt), cascade (C1 then C2 on every
item; the pass-2 answer is scored, pass 1's when pass 2 has none), best_of_n (N sampled C1
answers, each self-checked; the answer whose check gives Accept the highest probability).
Writes under OUTPUT_DIR/NAME/eval:

  items.parquet     one row per benchmark x model x mode x item: prediction, correct,
                    pass-1 answer, pass2_ran, verdict, tokens
  report.json       results [{benchmark, model, mode, n, accuracy, ci95}], breakdowns by
                    answer type, subject and level, paired base -> tuned differences,
                    relative gain, robustness (CoT - direct), the reflection matrix, best-of-N
  report.md         the same as tables;  accuracy.png, best_of_n.png, reflection.png

Resumable like synthesis: a killed run continues where it stopped. A missing or
incompatible adapter stops the run before any inference (exit 2).
"""


def cmd_evaluate(args) -> int:
    from casseat_ray.evaluate import job, report

    cfg = _load_checked(args, ("evaluate", "student"), writes=True)
    if cfg is None:
        return EXIT_USAGE
    job.check(cfg)  # benchmarks, models, the adapter: refused here, before Ray or an engine starts
    try:
        rep = job.run(cfg, fresh=args.fresh, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished blocks are kept in {cfg.run_dir / 'eval' / 'work'}; rerun the same command to resume", file=sys.stderr)
        return 130
    if "results" not in rep:
        print(f"stopped early: {rep}", file=sys.stderr)
        return EXIT_FAIL
    print(report.console_table(rep))
    print(f"\nreport: {cfg.run_dir / 'eval' / 'report.md'} (plots beside it)")
    if rep["retryable_items"]:
        print(f"{rep['retryable_items']} item(s) failed with engine errors or timeouts and count as wrong; rerun the same command to "
              "retry only those", file=sys.stderr)
    return EXIT_OK


RUN_HELP = """\
Run the whole pipeline as one resumable run: synthesize (teacher cascade, DDF, mix) -> train
(student LoRA on Ray Train) -> evaluate (base and tuned student, every configured mode), with
Ray started once for all three. Everything goes under OUTPUT_DIR/NAME (a local path or a URI
such as s3://bucket/runs, mirrored from a local staging folder):

  stats.json, sft/, rejects.parquet, ...   the synthesis outputs (see casseat synthesize --help)
  train/                                   adapter, metrics.jsonl, loss.png (see casseat train --help)
  eval/                                    items.parquet, report.json/md, plots (see casseat evaluate --help)
  run.json                                 each step's status, fingerprint and wall time
  summary.json                             funnel per stage, final training loss, accuracy per model
                                           and mode with 95% intervals, wall time per step (also printed)

Rerunning the same command skips finished steps and continues an unfinished one where it
stopped (no duplicates). A finished step whose config has changed is refused: --from STEP
redoes that step from scratch and every step after it.
"""


def cmd_run(args) -> int:
    from casseat_ray import run as pipeline_run
    from casseat_ray.config import INPUT_PARTS

    cfg = _load_checked(args, INPUT_PARTS, writes=True)
    if cfg is None:
        return EXIT_USAGE
    try:
        summary = pipeline_run.run(cfg, start=args.start, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to continue ({cfg.run_uri or cfg.run_dir})", file=sys.stderr)
        return 130
    except pipeline_run.StepFailed as e:
        print(str(e), file=sys.stderr)
        return EXIT_FAIL
    print("\n" + format_run_summary(summary))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="casseat", description=MAIN_HELP, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("validate", help="check a config and print it resolved", formatter_class=fmt,
                       description="Load CONFIG, apply the overrides, validate every key and check that input paths exist.\n"
                                   "Prints the resolved config as YAML (exit 0) or every problem, each naming the key\n"
                                   "and where it was set (exit 2).",
                       epilog="examples:\n  casseat validate jobs/configs/tiny-cpu.yaml train.lr=2e-4\n  casseat validate --explain | grep teacher.\n"
                              "  casseat validate jobs/configs/qwen2vl-7b-mathv360k.yaml --no-check-paths --cluster cluster/aws.yaml")
    _config_args(p)
    p.add_argument("--config", dest="config_option", type=Path, metavar="CONFIG", help="the config file, as the other commands take it (the positional form works too)")
    p.add_argument("--explain", action="store_true", help="list every key with its default and meaning, then exit")
    p.add_argument("--no-check-paths", action="store_true", help="skip the check that input files and model directories exist")
    p.add_argument("--cluster", type=Path, metavar="CLUSTER_YAML",
                   help="instead of printing the config, check a Ray cluster-launcher YAML against Ray's schema and check that "
                        "what each step asks for (teacher engines x GPUs, trainer workers, evaluation engines) fits its largest "
                        "node type and its maximum size; says what does not fit (exit 2)")
    p.set_defaults(func=cmd_validate)

    from casseat_ray.tiny import FAMILIES  # stdlib only at import

    p = sub.add_parser("make-tiny", help="build a tiny vision-language model offline", formatter_class=fmt,
                       description="Build a tiny Qwen2-VL (random weights, locally trained byte-level BPE tokenizer with the\n"
                                   "real special tokens, Qwen chat template, image and video processors) in OUT. It loads\n"
                                   "with transformers' AutoModelForImageTextToText / AutoProcessor and with vLLM.\n"
                                   "The teacher is larger than the student. The teacher is then trained for 400 CPU steps\n"
                                   "(2-3 minutes) on scripted solutions of the first 32 demo questions of its seed, deliberate\n"
                                   "C1 mistakes included, so it writes well-formed reasoning, verdicts (Accept when a second\n"
                                   "reading agrees, Refine when not) and final answers, right for about half of those\n"
                                   "questions; it knows nothing beyond them. The student stays untrained. The same role,\n"
                                   "seed and steps give identical files. --family builds a Qwen2.5-VL, a LLaVA-1.5 or a LLaVA-NeXT of the same\n"
                                   "size instead (what training is tested with for every student family the method names;\n"
                                   "the LLaVA-NeXT one is not run in vLLM here).")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--role", choices=["teacher", "student"], required=True, help="which size to build")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and tokenizer corpus (default 0)")
    p.add_argument("--format-steps", type=int, default=None, metavar="N", help="training steps on scripted answers (default: 400 for the teacher, 0 for the student)")
    p.add_argument("--family", choices=list(FAMILIES), default="qwen2_vl",
                   help="architecture: qwen2_vl (default), qwen2_5_vl, or llava (LLaVA-1.5:\n"
                        "CLIP tower, Llama language model, SentencePiece-style tokenizer, LLaVA's chat template)")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("make-demo-data", help="draw synthetic image math questions", formatter_class=fmt,
                       description="Draw N questions with PIL (counting shapes, bar charts, line lengths, colors, clocks,\n"
                                   "angles, dot lists) covering every answer type: multi_choice, integer, float with a\n"
                                   "precision, text and list. Writes OUT/demo.parquet in the canonical sample schema with\n"
                                   "PNG bytes embedded. Deterministic per seed.")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--n", type=int, default=64, help="number of questions (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_make_demo_data)

    p = sub.add_parser("data", help="look at the configured source data (no model runs)", formatter_class=fmt,
                       description="Commands about source data. They read, validate and filter (DDF level 1 rules) the\n"
                                   "configured sources on Ray Data without running any model.")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    q = data_sub.add_parser("inspect", help="counts per source, answer type and reject reason", formatter_class=fmt,
                            description="Stream the configured sources through reading, image validation and the DDF level-1\n"
                                        "rules (duplicates, unverifiable answers, empty or overlong questions, caps, budget)\n"
                                        "and print what would reach the teacher: counts per stage, source, answer type and\n"
                                        "reject reason. Nothing is written unless --rejects names a folder.",
                            epilog="example:\n  casseat data inspect --config jobs/configs/tiny-cpu.yaml ddf_source.budget=100 --json")
    _config_args(q, option=True)
    q.add_argument("--show", type=int, default=0, metavar="N",
                   help="also print N accepted rows as the teacher and the student will see them: parsed choices, the mapped "
                        "answer, the answer type, the rendered C1 prompt and its length in the student's tokens (image included)")
    q.add_argument("--json", action="store_true", help='print one JSON object: {"in", "accepted", "rejected", "by_source", "by_answer_type", "stages"}')
    q.add_argument("--rejects", type=Path, metavar="DIR", help="also write every rejected row (sample_id, source, reject_stage, reject_reason, reject_detail, question, ...) as Parquet to DIR; "
                        "over_budget rows only with ddf_source.write_over_budget=true")
    q.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("synthesize", help="build the SFT set with the teacher cascade (resumable)", formatter_class=fmt, description=SYNTH_HELP,
                       epilog="examples:\n  casseat synthesize --config jobs/configs/tiny-cpu.yaml\n"
                              "  casseat synthesize --config jobs/configs/tiny-cpu.yaml synthesis.mode=seat name=tiny-seat\n"
                              "  ray job submit --working-dir . -- python jobs/synthesize.py --config my.yaml ray.address=auto")
    _config_args(p, option=True)
    p.add_argument("--fresh", action="store_true", help="discard earlier teacher outputs of this run name and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("train", help="fine-tune the student with LoRA on Ray Train (resumable)", formatter_class=fmt, description=TRAIN_HELP,
                       epilog="examples:\n  casseat train --config jobs/configs/tiny-cpu.yaml train.num_workers=2\n"
                              "  casseat train --config jobs/configs/tiny-cpu.yaml --resume\n"
                              "  ray job submit --working-dir . -- python jobs/train.py --config my.yaml ray.address=auto")
    _config_args(p, option=True)
    p.add_argument("--resume", action="store_true", help="continue the run of this name from its last checkpoint")
    p.add_argument("--data", type=Path, help="SFT Parquet file or folder (default OUTPUT_DIR/NAME/sft)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (AFT's student sampling; logs, CI)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="check the adapter; optionally merge it into a full model", formatter_class=fmt, description=EXPORT_HELP)
    _config_args(p, option=True)
    p.add_argument("--adapter", type=Path, help="adapter folder (default OUTPUT_DIR/NAME/train/adapter)")
    p.add_argument("--merged", type=Path, metavar="OUT", help="also write the merged model to OUT")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="score base and tuned student on benchmarks in every mode (resumable)", formatter_class=fmt,
                       description=EVALUATE_HELP,
                       epilog="examples:\n  casseat evaluate --config jobs/configs/tiny-cpu.yaml\n"
                              "  casseat evaluate --config jobs/configs/tiny-cpu.yaml evaluate.modes='[cot, cascade, best_of_n]' evaluate.best_of_n=8\n"
                              "  ray job submit --working-dir . -- python jobs/evaluate.py --config my.yaml ray.address=auto")
    _config_args(p, option=True)
    p.add_argument("--fresh", action="store_true", help="discard earlier evaluation outputs of this run name and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("run", help="synthesize -> train -> evaluate as one resumable run", formatter_class=fmt, description=RUN_HELP,
                       epilog="examples:\n  casseat run --config jobs/configs/tiny-cpu.yaml\n"
                              "  casseat run --config jobs/configs/tiny-cpu.yaml --from train train.epochs=3\n"
                              "  ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/run.py --config my.yaml")
    _config_args(p, option=True)
    p.add_argument("--from", dest="start", choices=["synthesize", "train", "evaluate"], help="redo this step from scratch and every step after it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="run the pipeline on tiny models and generated data", formatter_class=fmt, description=DEMO_HELP)
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output directory (default out/demo)")
    p.add_argument("--n", type=int, default=32, help="demo questions to run through the teacher (default 32: those the tiny teacher learned)")
    p.add_argument("--heldout", type=int, default=32, help="held-out demo questions to evaluate on (default 32)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides of the tiny config (e.g. train.epochs=3 evaluate.modes='[cot, cascade]')")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep the console for our own output
    from casseat_ray.config import ConfigError

    t0 = time.perf_counter()
    try:
        code = args.func(args)
    except ConfigError as e:  # found once the run has looked at its inputs; nothing expensive ran
        print(f"config errors:\n{e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        from casseat_ray.runtime import actor_start_failure
        from casseat_ray.storage import disk_full

        cause = actor_start_failure(e)
        if cause is not None:
            from ray.data import DataContext

            retries = DataContext.get_current().max_consecutive_actor_init_deaths
            print(f"error: an actor could not start, {retries + 1} times in a row (ray.actor_init_retries={retries}): {cause[:500]}\n"
                  "what finished is kept: fix the cause and rerun the same command to resume", file=sys.stderr)
            return EXIT_FAIL
        if not disk_full(e):
            raise
        # Parts and outputs are written under a temporary name and renamed; a torn checkpoint is passed over.
        print(f"error: no space left on device ({str(e).splitlines()[0][:300]})\n"
              "what finished is kept (parts, checkpoints): free some space and rerun the same command to resume "
              "(casseat train: with --resume)", file=sys.stderr)
        return EXIT_FAIL
    if code == EXIT_OK and args.command not in ("validate",):
        print(f"done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
