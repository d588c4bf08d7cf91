"""vLLM's async engine (``AsyncLLM``) behind the engine interface; CPU build on CPU, CUDA build on GPU.

The engine owns an event loop on a thread of its own and runs every vLLM call there, so it
can be awaited from any other loop (a Ray Data actor's, a test's) and used blocking from
plain code, without vLLM's background tasks being tied to whichever loop touched it first.
Each request is rendered (chat template, image processor) and submitted on its own: the
engine's scheduler batches whatever is in flight, with no barrier between callers.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import threading
import time

from casseat_ray.config import EngineConfig, SamplingConfig
from casseat_ray.engines import Completion, EngineDead, failed, refused_too_long

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


def sampling_params(s: SamplingConfig, seeded: bool = True):
    """vLLM's SamplingParams for ``s``; ``seeded=False`` sends a sampled request without its
    seed (see ``VLLMEngine``: vLLM's CPU build cannot run seeded sampling under load)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = StructuredOutputsParams(choice=list(s.choice)) if s.choice else None
    seed = s.seed if seeded or s.temperature == 0 else None
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, n=s.n, seed=seed, stop=s.stop or None,
                          structured_outputs=structured, logprobs=s.logprobs, output_kind=RequestOutputKind.FINAL_ONLY)


def engine_kwargs(model: str, engine: EngineConfig) -> dict:
    """vLLM engine arguments for ``model`` from the config (``extra`` passed through last)."""
    kwargs = dict(
        model=model,
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
    # one device: the model runs inside the engine-core process ("uni", as ray.data.llm runs it),
    # not in a worker process of its own fed through a shared-memory queue every step
    backend = engine.distributed_executor_backend or ("uni" if engine.devices == 1 else None)
    if backend:
        kwargs["distributed_executor_backend"] = backend
    if engine.max_num_seqs:
        kwargs["max_num_seqs"] = engine.max_num_seqs
    if engine.enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=engine.max_lora_rank)
    kwargs.update(engine.extra)
    return kwargs


def keep_uni_on_cpu(kwargs: dict, cpu: bool) -> None:
    """vLLM's CPU build swaps the "uni" executor for a worker process of its own unless
    ``VLLM_ENABLE_V1_MULTIPROCESSING`` is 0; set it so that a one-device engine runs its model
    in the engine process there too. Measured on the tiny teacher, 2 cores, 512 rows: the
    synthesis pipeline 40 vs 35 rows/s (medians of 3), a whole run with the engine's start
    54 vs 76 s."""
    if cpu and kwargs.get("distributed_executor_backend") == "uni":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def _completion(c, n_prompt: int, n_cached: int | None = None) -> Completion:
    tokens, tops = [], []
    for tid, cands in zip(c.token_ids, c.logprobs or []):
        chosen = cands.get(tid)
        tokens.append(chosen.decoded_token if chosen is not None else "")
        top: dict[str, float] = {}
        for lp in cands.values():
            key = lp.decoded_token or ""
            top[key] = max(top.get(key, float("-inf")), lp.logprob)
        tops.append(top)
    # vLLM ends a request it failed inside the engine with finish reason "error" and no message:
    # give it one, so that ``error`` alone tells every caller a request failed
    error = "the engine ended the request with an error" if c.finish_reason == "error" else None
    return Completion(c.text, c.finish_reason, n_prompt, len(c.token_ids), error=error, cached_tokens=n_cached or 0, tokens=tokens,
                      top_logprobs=tops)


def _over_context(e: Exception) -> bool:
    """vLLM refused the prompt for its length. The renderer counts the rendered prompt, image
    tokens included, in this process and raises before the request reaches the engine core;
    the input processor's own check is the fallback."""
    from vllm.exceptions import VLLMValidationError

    return isinstance(e, VLLMValidationError) and (e.parameter == "input_tokens" or "maximum model length" in str(e))


class VLLMEngine:
    """One ``vllm.v1.engine.async_llm.AsyncLLM``; ``generate`` answers one multi-turn image
    conversation, ``chat`` a list of them."""

    def __init__(self, model: str, engine: EngineConfig | None = None, sampling: SamplingConfig | None = None):
        engine = engine or EngineConfig()
        self.model = str(model)
        self.default_sampling = sampling or SamplingConfig()
        self.max_num_seqs = engine.max_num_seqs
        self._ids = itertools.count()
        self._loras: dict[str, object] = {}  # adapter -> its LoRARequest
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        t0 = time.perf_counter()
        try:
            self.llm = self._on_loop(self._start(engine))
        except BaseException:
            self._stop_loop()
            raise
        self.start_seconds = time.perf_counter() - t0
        if self.max_num_seqs is None:
            self.max_num_seqs = self.llm.vllm_config.scheduler_config.max_num_seqs

    async def _start(self, engine: EngineConfig):
        from vllm import AsyncEngineArgs
        from vllm.renderers import ChatParams
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from vllm.platforms import current_platform

        kwargs = engine_kwargs(self.model, engine)
        keep_uni_on_cpu(kwargs, current_platform.is_cpu())
        args = AsyncEngineArgs(**dict(dict(disable_log_stats=True), **kwargs))
        # Offline batch defaults (scheduler token budget, max_num_seqs), as vllm.LLM gets them.
        llm = AsyncLLM.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)
        # What LLM.chat renders with: the model's template, a generation prompt, and no extra
        # special tokens (the template emits them).
        self._chat_params = ChatParams(chat_template_kwargs=dict(add_generation_prompt=True, continue_final_message=False))
        self._tok_params = llm.renderer.default_chat_tok_params.with_kwargs(add_special_tokens=False)
        # vLLM 0.32's CPU LoRA path corrupts requests without an adapter that share an engine
        # step with requests that have one (seen on the tiny student: base answers turn to
        # noise). On CPU, requests of different adapters therefore take turns: one adapter
        # (or none) is on the engine at a time.
        self._one_adapter_at_a_time = engine.enable_lora and current_platform.is_cpu()
        # vLLM 0.32 rewinds a seeded request's random generator when a step computes only part
        # of its prompt (many prompts in flight, the step's token budget full), which a CPU
        # generator cannot do: "RuntimeError: CPU Generator does not use offset" kills the
        # engine, and the same batch kills its replacement. On CPU, sampled requests therefore
        # go without their seed: their answers are not reproducible there (greedy ones are).
        self._seeded = not current_platform.is_cpu()
        if not self._seeded:
            log.info("vLLM CPU build: sampled requests (temperature > 0) run without their per-request seed")
        self._turn = asyncio.Condition()
        self._active: tuple[str | None, int] = (None, 0)  # (adapter on the engine, its requests in flight)
        return llm

    def _on_loop(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _lora(self, adapter):
        """The request of ``adapter`` (a folder, or a ``ShippedAdapter`` copied to this node
        at its first use), one id per adapter."""
        if adapter is None:
            return None
        key = str(adapter)
        if key not in self._loras:
            from vllm.lora.request import LoRARequest

            from casseat_ray.adapters import local_path

            idx = len(self._loras) + 1
            self._loras[key] = LoRARequest(f"adapter{idx}", idx, local_path(adapter))
        return self._loras[key]

    async def _generate_here(self, conversation: list[dict], sampling: SamplingConfig, adapter) -> list[Completion]:
        """Runs on the engine's loop. Anything wrong with this one request fails it alone."""
        if self.llm.errored:
            raise EngineDead(str(self.llm.dead_error))
        if self._one_adapter_at_a_time:
            async with self._turn:
                key = None if adapter is None else str(adapter)
                await self._turn.wait_for(lambda: self._active[1] == 0 or self._active[0] == key)
                self._active = (key, self._active[1] + 1)
            try:
                return await self._request(conversation, sampling, adapter)
            finally:
                async with self._turn:
                    self._active = (self._active[0], self._active[1] - 1)
                    self._turn.notify_all()
        return await self._request(conversation, sampling, adapter)

    async def _request(self, conversation: list[dict], sampling: SamplingConfig, adapter) -> list[Completion]:
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            messages = to_vllm_messages(conversation)
            _, (prompt,) = await self.llm.renderer.render_chat_async([messages], self._chat_params, self._tok_params)
            final = None
            async for out in self.llm.generate(prompt, sampling_params(sampling, self._seeded), f"req-{next(self._ids)}", lora_request=self._lora(adapter)):
                final = out
        except EngineDeadError as e:
            raise EngineDead(str(e)) from e
        except Exception as e:  # undecodable image, prompt over max_model_len and the like
            if self.llm.errored:
                raise EngineDead(str(self.llm.dead_error)) from e
            if _over_context(e):
                return [refused_too_long(str(e))]
            return [failed(f"{type(e).__name__}: {e}")]
        n_prompt = len(final.prompt_token_ids or [])
        return [_completion(c, n_prompt, final.num_cached_tokens) for c in final.outputs]

    async def generate(self, conversation: list[dict], sampling: SamplingConfig | None = None, adapter: str | None = None) -> list[Completion]:
        future = asyncio.run_coroutine_threadsafe(self._generate_here(conversation, sampling or self.default_sampling, adapter), self._loop)
        return await asyncio.wrap_future(future)

    def chat(self, conversations: list[list[dict]], sampling: SamplingConfig | None = None, adapter: str | None = None) -> list[list[Completion]]:
        async def all_of():
            return await asyncio.gather(*(self._generate_here(c, sampling or self.default_sampling, adapter) for c in conversations))

        return self._on_loop(all_of()) if conversations else []

    def clear_caches(self) -> None:
        """Empty the prefix cache, the vision encoder's cache and the image-processor cache, with
        no request in flight: what follows runs as on a fresh engine whose kernels are already
        warm (repeated benchmark passes over the same rows would otherwise replay cached work)."""
        async def clear():
            if not await self.llm.reset_prefix_cache():
                raise RuntimeError("the prefix cache was not cleared: requests are in flight")
            await self.llm.reset_encoder_cache()
            await self.llm.reset_mm_cache()

        self._on_loop(clear())

    def close(self) -> None:
        """Shut vLLM's engine process down and stop the loop thread (idempotent)."""
        if self._loop.is_closed():
            return
        if getattr(self, "llm", None) is not None:
            self._on_loop(self._shutdown())
        self._stop_loop()

    async def _shutdown(self) -> None:
        self.llm.shutdown()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:  # vLLM's output handlers: end them here, not at interpreter exit
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
