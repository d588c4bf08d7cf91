"""vLLM's offline ``LLM`` behind the engine interface (CPU build on CPU, CUDA build on GPU)."""

from __future__ import annotations

import io
import logging
import time

from casseat_ray.config import EngineConfig, SamplingConfig
from casseat_ray.engines import Completion, EngineDead, failed

log = logging.getLogger(__name__)


def _to_vllm_parts(content) -> list[dict] | str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part["type"] == "image":
            img = part["image"]
            if isinstance(img, (bytes, bytearray)):
                from PIL import Image

                img = Image.open(io.BytesIO(img))
                img.load()
            parts.append({"type": "image_pil", "image_pil": img})
        else:
            parts.append(part)
    return parts


def to_vllm_messages(conversation: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": _to_vllm_parts(m["content"])} for m in conversation]


def sampling_params(s: SamplingConfig):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = StructuredOutputsParams(choice=list(s.choice)) if s.choice else None
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, n=s.n, seed=s.seed, stop=s.stop or None,
                          structured_outputs=structured)


class VLLMEngine:
    """One ``vllm.LLM``; ``chat`` runs a batch of multi-turn image conversations."""

    def __init__(self, model: str, engine: EngineConfig | None = None, sampling: SamplingConfig | None = None):
        from vllm import LLM

        engine = engine or EngineConfig()
        self.model = str(model)
        self.default_sampling = sampling or SamplingConfig()
        kwargs = dict(
            model=self.model,
            dtype=engine.dtype,
            max_model_len=engine.max_model_len,
            tensor_parallel_size=engine.tensor_parallel_size,
            pipeline_parallel_size=engine.pipeline_parallel_size,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            enable_prefix_caching=engine.enable_prefix_caching,
            limit_mm_per_prompt=engine.limit_mm_per_prompt,
            enforce_eager=engine.enforce_eager,
            seed=engine.seed,
        )
        if engine.mm_processor_kwargs:
            kwargs["mm_processor_kwargs"] = engine.mm_processor_kwargs
        if engine.kv_cache_memory_bytes:
            kwargs["kv_cache_memory_bytes"] = engine.kv_cache_memory_bytes
        if engine.distributed_executor_backend:
            kwargs["distributed_executor_backend"] = engine.distributed_executor_backend
        if engine.max_num_seqs:
            kwargs["max_num_seqs"] = engine.max_num_seqs
        if engine.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=engine.max_lora_rank)
        kwargs.update(engine.extra)
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.start_seconds = time.perf_counter() - t0
        self._lora_ids: dict[str, int] = {}

    def _lora(self, adapter: str | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        idx = self._lora_ids.setdefault(str(adapter), len(self._lora_ids) + 1)
        return LoRARequest(f"adapter{idx}", idx, str(adapter))

    def _run(self, messages, params, lora) -> list[list[Completion]]:
        outs = self.llm.chat(messages, sampling_params=params, use_tqdm=False, lora_request=lora)
        result = []
        for o in outs:
            n_prompt = len(o.prompt_token_ids or [])
            result.append([Completion(c.text, c.finish_reason, n_prompt, len(c.token_ids)) for c in o.outputs])
        return result

    def chat(self, conversations, sampling: SamplingConfig | None = None, adapter: str | None = None):
        from vllm.v1.engine.exceptions import EngineDeadError

        params = sampling_params(sampling or self.default_sampling)
        lora = self._lora(adapter)
        result: list[list[Completion] | None] = [None] * len(conversations)
        todo: dict[int, list[dict]] = {}
        for i, conv in enumerate(conversations):
            try:
                todo[i] = to_vllm_messages(conv)
            except Exception as e:  # undecodable image and the like: this row only
                result[i] = [failed(f"{type(e).__name__}: {e}")]
        if not todo:
            return result
        try:
            for i, out in zip(todo, self._run(list(todo.values()), params, lora)):
                result[i] = out
            return result
        except EngineDeadError as e:
            raise EngineDead(str(e)) from e
        except Exception as batch_error:  # one bad conversation: isolate it row by row
            log.warning("batch of %d failed (%s); retrying row by row", len(todo), batch_error)
        for i, messages in todo.items():
            try:
                result[i] = self._run([messages], params, lora)[0]
            except EngineDeadError as e:
                raise EngineDead(str(e)) from e
            except Exception as e:
                result[i] = [failed(f"{type(e).__name__}: {e}")]
        return result
