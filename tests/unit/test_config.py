from pathlib import Path

import pytest
from pydantic import BaseModel

from casseat_ray import config as C
from casseat_ray.cli import main

GOOD = """\
name: t1
sources:
  - name: demo
    format: canonical
    path: {data}
teacher:
  model: {model}
  sampling: {{temperature: 0.0, max_tokens: 256}}
student:
  model: {model}
train:
  lr: 2.0e-4
"""


@pytest.fixture
def good_file(tmp_path):
    (tmp_path / "data.parquet").write_bytes(b"")
    (tmp_path / "model").mkdir()
    f = tmp_path / "cfg.yaml"
    f.write_text(GOOD.format(data=tmp_path / "data.parquet", model=tmp_path / "model"))
    return f


def test_good_config_loads_with_defaults(good_file):
    cfg = C.load_config(good_file)
    assert cfg.name == "t1"
    assert cfg.train.lr == 2e-4
    assert cfg.teacher.sampling.max_tokens == 256
    assert cfg.teacher.engine.enable_prefix_caching is True  # default on
    assert cfg.student.lora.r == 8 and cfg.student.lora.alpha == 16
    assert C.check_inputs(cfg) == []
    assert cfg.run_dir == Path("out/t1")


def test_overrides_apply_after_file_and_parse_yaml(good_file):
    cfg = C.load_config(good_file, ["train.lr=3e-5", "sources.0.max_samples=10", "synthesis.mode=seat", "teacher.sampling.stop=[x, y]"])
    assert cfg.train.lr == 3e-5
    assert cfg.sources[0].max_samples == 10
    assert cfg.synthesis.mode == "seat"
    assert cfg.teacher.sampling.stop == ["x", "y"]


def test_misspelled_key_names_key_and_file(good_file):
    good_file.write_text(good_file.read_text().replace("  lr: 2.0e-4", "  lrate: 2.0e-4"))
    with pytest.raises(C.ConfigError) as e:
        C.load_config(good_file)
    msg = str(e.value)
    assert f"{good_file}: train.lrate: unknown key" in msg


def test_wrong_type_names_key_expected_and_value(good_file):
    with pytest.raises(C.ConfigError) as e:
        C.load_config(good_file, ["teacher.sampling.max_tokens=lots"])
    msg = str(e.value)
    assert "command line (teacher.sampling.max_tokens=lots): teacher.sampling.max_tokens:" in msg
    assert "valid integer" in msg and "'lots'" in msg


def test_wrong_choice_lists_allowed_values(good_file):
    good_file.write_text(good_file.read_text() + "synthesis:\n  mode: cascde\n")
    with pytest.raises(C.ConfigError, match=r"synthesis.mode: input should be 'cascade', 'seat' or 'cot', got 'cascde'"):
        C.load_config(good_file)


def test_bounds_are_checked(good_file):
    with pytest.raises(C.ConfigError, match=r"train.warmup_ratio: Input should be less than 1"):
        C.load_config(good_file, ["train.warmup_ratio=1.5"])


def test_missing_config_file(tmp_path):
    with pytest.raises(C.ConfigError, match=r"nope.yaml: config file not found"):
        C.load_config(tmp_path / "nope.yaml")


def test_missing_input_paths_are_named(good_file, tmp_path):
    cfg = C.load_config(good_file, [f"sources.0.path={tmp_path}/missing.jsonl", f"student.model={tmp_path}/no-model"])
    problems = C.check_inputs(cfg)
    assert f"sources.0.path: source data not found: {tmp_path}/missing.jsonl" in problems
    assert f"student.model: model directory not found: {tmp_path}/no-model" in problems
    # A hub id is not a local path and is not checked here.
    assert C.check_inputs(C.load_config(good_file, ["teacher.model=Qwen/Qwen2-VL-7B-Instruct"])) == []
    # a mistyped relative folder is no hub id either: named before any work, not after a minute of Ray
    typo = C.check_inputs(C.load_config(good_file, ["teacher.model=out/tiny/models/teachr"]))
    assert typo == ["teacher.model: model directory not found: out/tiny/models/teachr (nor is it a hub id such as Qwen/Qwen2-VL-2B-Instruct)"]
    assert [C.is_hub_id(r) for r in ("Qwen/Qwen2-VL-2B-Instruct", "gpt2", "a/b/c", "a/../b", "org/-x")] == [True, True, False, False, False]
    judged = C.load_config(good_file, ["ddf_labeled.judge.enabled=true", f"ddf_labeled.judge.model={tmp_path}/no-judge"])
    assert C.check_inputs(judged) == [f"ddf_labeled.judge.model: model directory not found: {tmp_path}/no-judge"]


def test_an_engine_backend_is_named_and_checked_before_any_work(good_file):
    with pytest.raises(C.ConfigError, match="teacher.engine.backend"):
        C.load_config(good_file, ["teacher.engine.backend=no colon here"])
    ok = C.load_config(good_file, ["teacher.engine.backend=casseat_ray.engines.vllm:VLLMEngine"])
    assert C.check_inputs(ok) == []
    bad = C.load_config(good_file, ["teacher.engine.backend=nowhere.engines:Fast", "evaluate.engine.backend=gone:Engine"])
    assert C.check_inputs(bad) == ["teacher.engine.backend: module not found: nowhere.engines",
                                   "evaluate.engine.backend: module not found: gone"]


def test_not_yaml_and_not_mapping(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: [unclosed\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_config(f)
    f.write_text("- a\n- b\n")
    with pytest.raises(C.ConfigError, match="top level must be a mapping"):
        C.load_config(f)


def test_bad_override_syntax_and_list_index(good_file):
    with pytest.raises(C.ConfigError, match="must look like key.sub=value"):
        C.load_config(good_file, ["train.lr"])
    with pytest.raises(C.ConfigError, match=r"command line: sources.3.name: sources is a list of 1; use an index below it"):
        C.load_config(good_file, ["sources.3.name=x"])


def test_cross_checks(good_file):
    with pytest.raises(C.ConfigError, match="cot_samples > 1 needs teacher.sampling.temperature > 0"):
        C.load_config(good_file, ["synthesis.cot_samples=4"])
    assert C.load_config(good_file, ["synthesis.cot_samples=4", "teacher.sampling.temperature=0.7"]).synthesis.cot_samples == 4
    with pytest.raises(C.ConfigError, match="best_of_n > 1 needs evaluate.best_of_n_temperature > 0"):
        C.load_config(good_file, ["evaluate.modes=[cot, best_of_n]", "evaluate.best_of_n_temperature=0"])
    assert C.load_config(good_file, ["evaluate.modes=[best_of_n]", "evaluate.best_of_n=1", "evaluate.best_of_n_temperature=0"]).evaluate.best_of_n == 1
    with pytest.raises(C.ConfigError, match="per_source_cap names unknown sources"):
        C.load_config(good_file, ["ddf_source.per_source_cap={other: 3}"])


def test_multi_device_engines_are_placed_in_groups_and_impossible_placements_refused(good_file):
    from casseat_ray.runtime import engine_actor_args

    cfg = C.load_config(good_file, ["teacher.num_gpus=1"])
    resources, engine = engine_actor_args(cfg.teacher.engine, cfg.teacher.num_cpus, cfg.teacher.num_gpus, cfg.teacher.placement)
    assert resources == {"num_cpus": 1.0, "num_gpus": 1} and engine.distributed_executor_backend is None  # one device: no group
    cfg = C.load_config(good_file, ["teacher.engine.tensor_parallel_size=2", "teacher.engine.pipeline_parallel_size=2",
                                    "teacher.placement.accelerator_type=H100"])
    resources, engine = engine_actor_args(cfg.teacher.engine, cfg.teacher.num_cpus, cfg.teacher.num_gpus, cfg.teacher.placement)
    assert resources["num_gpus"] == 0 and engine.distributed_executor_backend == "ray"
    bundles, strategy = resources["ray_remote_args_fn"].args
    assert strategy == "STRICT_PACK" and bundles == [{"GPU": 1, "CPU": 1, "accelerator_type:H100": 0.001}] * 4
    with pytest.raises(C.ConfigError, match="teacher: the engine actor asks for 2.0 CPUs but a placement bundle holds 1"):
        C.load_config(good_file, ["teacher.engine.tensor_parallel_size=2", "teacher.num_cpus=2"])
    with pytest.raises(C.ConfigError, match="distributed_executor_backend 'mp' cannot use the actor's placement group"):
        C.load_config(good_file, ["teacher.engine.tensor_parallel_size=2", "teacher.engine.distributed_executor_backend=mp"])


def test_local_model_directories_become_absolute_for_workers(good_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = C.load_config(good_file, ["student.model=model", "teacher.model=Qwen/Qwen2-VL-7B-Instruct"])
    fixed = C.with_absolute_models(cfg)
    assert fixed.student.model == str(tmp_path / "model")  # a directory here: made absolute
    assert fixed.teacher.model == "Qwen/Qwen2-VL-7B-Instruct"  # a hub id: untouched
    assert cfg.student.model == "model"  # the original is not changed


def _sections(model: type[BaseModel], seen: set) -> None:
    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        for t in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(t, type) and issubclass(t, BaseModel):
                _sections(t, seen)


def test_every_field_is_described_and_every_section_forbids_extras():
    seen: set = set()
    _sections(C.Config, seen)
    assert len(seen) >= 15
    for model in seen:
        assert model.model_config.get("extra") == "forbid", model
        for name, field in model.model_fields.items():
            assert field.description and len(field.description) > 10, f"{model.__name__}.{name}"


def test_explain_lists_nested_keys():
    lines = C.explain()
    assert any(line.startswith("teacher.engine.enable_prefix_caching = True:") for line in lines)
    assert any(line.startswith("sources.N.fields.choices_delimiter = ';':") for line in lines)


def test_resolved_config_round_trips(good_file, tmp_path):
    cfg = C.load_config(good_file)
    again = tmp_path / "again.yaml"
    again.write_text(C.to_yaml(cfg))
    assert C.load_config(again) == cfg


def test_cli_validate_exit_codes(good_file, capsys):
    assert main(["validate", str(good_file), "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 1.0" in out and "name: t1" in out
    good_file.write_text(good_file.read_text().replace("name: t1", "nmae: t1"))
    assert main(["validate", str(good_file)]) == 2
    err = capsys.readouterr().err
    assert f"{good_file}: nmae: unknown key" in err


def test_cli_validate_reports_missing_paths(good_file, tmp_path, capsys):
    assert main(["validate", str(good_file), f"sources.0.path={tmp_path}/gone.parquet"]) == 2
    assert f"sources.0.path: source data not found: {tmp_path}/gone.parquet" in capsys.readouterr().err
    assert main(["validate", str(good_file), f"sources.0.path={tmp_path}/gone.parquet", "--no-check-paths"]) == 0
