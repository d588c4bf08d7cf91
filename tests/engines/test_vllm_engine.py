"""The real vLLM engine (CPU build) on the tiny teacher; one engine for the whole session."""

import io
import os

from PIL import Image

from casseat_ray import prompts
from casseat_ray.config import SamplingConfig
from casseat_ray.engines import PROMPT_TOO_LONG, Engine, failed, failure_reason, image_part, text_part, user
from casseat_ray.inference.turns import c1_conversation, c2_conversation


def test_engine_implements_protocol(teacher_engine):
    assert isinstance(teacher_engine, Engine)
    assert 1 < teacher_engine.start_seconds < 600


def test_a_one_device_engine_runs_its_model_in_the_engine_process(teacher_engine):
    from casseat_ray.config import EngineConfig
    from casseat_ray.engines.vllm import engine_kwargs

    assert engine_kwargs("m", EngineConfig())["distributed_executor_backend"] == "uni"
    assert "distributed_executor_backend" not in engine_kwargs("m", EngineConfig(tensor_parallel_size=2))
    assert engine_kwargs("m", EngineConfig(tensor_parallel_size=2, distributed_executor_backend="ray"))["distributed_executor_backend"] == "ray"
    # what vLLM resolved: no worker process of its own, on the CPU build too
    assert teacher_engine.llm.vllm_config.parallel_config.distributed_executor_backend == "uni"


def test_a_one_device_engine_on_cpu_asks_vllm_to_keep_uni(monkeypatch):
    # The session sets the variable for every test; here the engine's own setting is checked.
    from casseat_ray.engines.vllm import keep_uni_on_cpu

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    keep_uni_on_cpu({"distributed_executor_backend": "ray"}, cpu=True)
    keep_uni_on_cpu({"distributed_executor_backend": "uni"}, cpu=False)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ  # a multi-device engine, or a GPU: vLLM's default
    keep_uni_on_cpu({"distributed_executor_backend": "uni"}, cpu=True)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_two_turn_image_cascade(teacher_engine, demo_rows):
    rows = demo_rows[:6]
    c1, c2 = prompts.load("c1"), prompts.load("c2")
    first = teacher_engine.chat([c1_conversation(r, c1) for r in rows])
    assert [len(x) for x in first] == [1] * 6
    for comp in (x[0] for x in first):
        assert comp.error is None and comp.finish_reason in ("stop", "length")
        assert 0 < comp.output_tokens <= 24 and comp.prompt_tokens > 30
    second = teacher_engine.chat([c2_conversation(r, c1, a[0].text, c2) for r, a in zip(rows, first)])
    for a, b in zip(first, second):
        # The C2 prompt holds the whole C1 exchange plus the C2 turn.
        assert b[0].prompt_tokens > a[0].prompt_tokens + a[0].output_tokens
        assert b[0].error is None
    # PIL images and encoded bytes are the same input (same batch size: batching changes numerics).
    prompt = text_part(c1.render(question=rows[0]["question"]))
    as_pil = teacher_engine.chat([[user(image_part(Image.open(io.BytesIO(rows[0]["image"]))), prompt)]])
    as_bytes = teacher_engine.chat([[user(image_part(rows[0]["image"]), prompt)]])
    assert as_pil[0][0].text == as_bytes[0][0].text


def test_bad_row_fails_alone(teacher_engine, demo_rows):
    good = [user(image_part(demo_rows[1]["image"]), text_part("How many?"))]
    bad_image = [user(image_part(b"this is not an image"), text_part("How many?"))]
    too_long = [user(text_part("count " * 5000))]  # over max_model_len
    out = teacher_engine.chat([good, bad_image, too_long, good])
    assert out[0][0].error is None and out[3][0].error is None
    assert out[0][0].text and out[3][0].text
    assert out[1][0].finish_reason == "error" and "UnidentifiedImageError" in out[1][0].error
    # over max_model_len: refused by vLLM's renderer in this process, before the engine core
    # sees it, and marked as the row's own final failure (never retried)
    assert out[2][0].finish_reason == PROMPT_TOO_LONG and "maximum context length" in out[2][0].error
    assert out[2][0].prompt_tokens == 0 and failure_reason(out[2][0].finish_reason) == "prompt_too_long"
    assert failure_reason(out[1][0].finish_reason) == "engine_error"
    assert failed("x").truncated is False


def test_n_samples_and_budget(teacher_engine, demo_rows):
    from casseat_ray import prompts

    # the C1 prompt: the format-trained teacher answers it at length
    conv = [user(image_part(demo_rows[2]["image"]), text_part(prompts.load("c1").render(question=demo_rows[2]["question"])))]
    # long enough to get past the opening the teacher has learned word for word (the CPU build
    # samples without the seed: at 24 tokens the 3 samples were all equal 5 times in 30, at 64 never)
    outs = teacher_engine.chat([conv], SamplingConfig(n=3, temperature=1.5, max_tokens=64, seed=1))
    assert len(outs[0]) == 3
    assert all(c.output_tokens <= 64 for c in outs[0])
    assert len({c.text for c in outs[0]}) > 1  # sampled, not greedy
    greedy = teacher_engine.chat([conv], SamplingConfig(max_tokens=5))
    assert greedy[0][0].finish_reason == "length" and greedy[0][0].truncated


def test_model_extractor_runs_through_the_engine(teacher_engine):
    from casseat_ray.answers import model_extract, score

    sample = {"question": "How many circles?", "choices": [], "answer": "3", "answer_type": "integer"}
    responses = ["I counted them all carefully, there seem to be three of them.", "Hard to say."]
    extractions = model_extract(teacher_engine, [(r, sample) for r in responses])
    assert len(extractions) == 2
    assert all(e is None or (isinstance(e, str) and "\n" not in e) for e in extractions)
    scored = score(responses[0], sample, extraction=extractions[0] or "", method="model")
    assert scored.method == "model"  # outputs record that a model, not a rule, extracted it


def test_a_reply_no_rule_parses_is_scored_on_the_model_extractor(teacher_engine, demo_rows):
    import asyncio
    from dataclasses import replace

    from casseat_ray.answers import extraction_conversation, parse_extraction, score
    from casseat_ray.inference.modes import ModeCall, run_mode, scored_dict

    row = next(r for r in demo_rows if r["answer_type"] == "integer")
    # three tokens: cut before any final answer, so no rule finds one
    call = ModeCall(mode="cot", prompts={"c1": prompts.load("c1")}, model="teacher", sampling=SamplingConfig(max_tokens=3))
    plain = asyncio.run(run_mode(teacher_engine, row, call))
    text = plain["c1_texts"][0]
    assert plain["c1_scores"][0]["extraction"] is None and plain["c1_scores"][0]["method"] == "none"
    extract = prompts.load("extract")
    extracted = asyncio.run(run_mode(teacher_engine, row, replace(call, extractor=extract)))
    assert extracted["c1_texts"] == [text] and extracted["c1_output_tokens"] == plain["c1_output_tokens"]  # extraction is not the answer's cost
    reply = teacher_engine.chat([extraction_conversation(text, row, extract)], SamplingConfig(temperature=0.0, max_tokens=32))[0][0]
    expected = parse_extraction(reply.text)
    assert expected is not None  # the tiny teacher always says something
    assert extracted["c1_scores"][0] == scored_dict(score(text, row, extraction=expected, method="model"))


def test_a_request_over_its_timeout_fails_alone_and_is_aborted_in_the_engine(teacher_engine, demo_rows):
    import asyncio
    import time

    from casseat_ray.inference.stage import TimedEngine

    convs = [c1_conversation(r, prompts.load("c1")) for r in demo_rows[:2]]
    long = SamplingConfig(max_tokens=1500, temperature=1.0, n=4)  # seeded: the same length every time
    t0 = time.perf_counter()
    assert len(teacher_engine.chat([convs[0]], long)[0]) == 4
    took = time.perf_counter() - t0
    timed = TimedEngine(teacher_engine, took / 3)  # the same request again cannot finish in time

    async def both():
        return await asyncio.gather(timed.generate(convs[0], long), teacher_engine.generate(convs[1], SamplingConfig(max_tokens=8)))

    slow, (quick,) = asyncio.run(both())
    assert len(slow) == 1 and slow[0].finish_reason == "error" and slow[0].error.startswith("timeout: no reply within"), slow[0]
    assert quick.error is None and quick.text  # its neighbour is unaffected
    deadline = time.time() + 10
    while teacher_engine.llm.output_processor.has_unfinished_requests() and time.time() < deadline:
        time.sleep(0.1)
    assert not teacher_engine.llm.output_processor.has_unfinished_requests()  # the timed-out request was aborted


def test_a_request_the_engine_ends_with_an_error_carries_a_message():
    """vLLM's finish reason "error" comes without text; the completion gets one, so every
    caller that checks ``error`` (modes, evaluation's retry, DDF level 2) sees the failure."""
    from types import SimpleNamespace

    from casseat_ray.engines.vllm import _completion
    from casseat_ray.inference.modes import first_failure

    out = SimpleNamespace(text="", finish_reason="error", token_ids=[], logprobs=None)
    c = _completion(out, 7)
    assert c.error and c.finish_reason == "error" and c.prompt_tokens == 7
    row = dict(c1_finish=[c.finish_reason], c1_errors=[c.error], c2_finish=None, c2_errors=None)
    assert first_failure(row) == ("engine_error", f"C1: {c.error}")
    assert _completion(SimpleNamespace(text="ok", finish_reason="stop", token_ids=[1], logprobs=None), 7).error is None


def test_seeded_sampling_under_a_full_token_budget_keeps_the_engine_alive(teacher_engine, demo_rows):
    """More sampled prompts in flight than one engine step's token budget holds: vLLM computes
    some prompts over two steps, and on its CPU build a seeded request then kills the engine
    ("CPU Generator does not use offset"). The engine sends sampled requests unseeded there."""
    c1 = prompts.load("c1")
    convs = [c1_conversation(r, c1) for r in demo_rows[:8]] * 8  # 64 prompts x n=2, past the 4,096-token step budget
    outs = teacher_engine.chat(convs, SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=0))
    assert all(len(o) == 2 and all(c.error is None for c in o) for o in outs)
    assert not teacher_engine.llm.errored


def test_c2_reuses_its_c1_exchange_from_the_prefix_cache_until_the_caches_are_cleared(teacher_engine, demo_rows):
    # the cascade's saving, and what a benchmark's repeated passes clear to start as a fresh engine
    c1, c2 = prompts.load("c1"), prompts.load("c2")
    ((first,),) = teacher_engine.chat([c1_conversation(demo_rows[9], c1)])
    conversation = c2_conversation(demo_rows[9], c1, first.text, c2)
    ((cached,),) = teacher_engine.chat([conversation])
    assert 0 < cached.cached_tokens < cached.prompt_tokens  # whole blocks of the C1 exchange (128 tokens each on CPU)
    teacher_engine.clear_caches()
    ((fresh,),) = teacher_engine.chat([conversation])
    assert fresh.cached_tokens == 0
    assert cached.text == fresh.text  # greedy: the caches change the cost, not the answer
