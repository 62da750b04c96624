"""llama.cpp engine: a GGUF model in process through llama-cpp-python, sampled by Agora's public rule.

llama.cpp computes the logits; the token is chosen from them by `verify.rule.choose_token` (seed,
request id, position), exactly as the built-in engine does, so receipts carry the model's own token
ids, logprobs and top-k alternatives and any verifier holding the same GGUF replays them. The GGUF's
quantization (Q8_0, Q4_K_M, F32 …) is the receipt's precision class (`gguf-q8_0` …): a quantized
provider is checked against replays of its own file, not excused by wide tolerances.

One llama.cpp context serves one sequence, so requests run one after another (no batching).
Install with `pip install 'agoranet[llamacpp]'`.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import threading
from contextlib import aclosing, contextmanager
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agoranet.core.errors import EngineError, ModelError, RequestError
from agoranet.engine.base import Generation, GenerationRequest, TokenEvent, check_request, prompt_ids, cut_at_stop, drain
from agoranet.verify.rule import choose_token

log = logging.getLogger(__name__)

RECEIPT_TOP_K = 5
# The KV cache in fp32, not llama.cpp's default f16: a provider decodes token by token and a verifier
# replays in one batched pass, and with an f16 cache those two differ by up to ~0.45 in a logprob on a Q8_0
# file (a few sequences in ten); with fp32 nearly every sequence replays bit for bit. It doubles the
# cache's memory.
GGML_TYPE_F32 = 0


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelError("the llama.cpp engine needs llama-cpp-python, which is not installed",
                         hint="pip install 'agoranet[llamacpp]'") from exc
    return llama_cpp


def gguf_precision(metadata: dict[str, str]) -> str:
    """The precision class a GGUF declares: its file type, e.g. `gguf-q8_0`, `gguf-q4_k_m`, `gguf-f32`."""
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(int(metadata["general.file_type"])).name
    except (KeyError, ValueError) as exc:
        raise ModelError(f"the GGUF does not declare a known general.file_type ({exc})",
                         hint="write the GGUF with a current llama.cpp or gguf package") from exc
    return "gguf-" + name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


class GGUFModel:
    """A GGUF file loaded with llama.cpp: its tokenizer and chat template, and logits for any ids.

    It is also the verifier's replay model: `__call__(input_ids=…)` returns every position's logits,
    as a transformers model does."""

    def __init__(self, path: Path, *, threads: int | None = None, context_length: int | None = None,
                 all_logits: bool = False) -> None:
        llama_cpp = _llama_cpp()
        if not path.is_file():
            raise ModelError(f"no GGUF file at {path}", hint="pass --model FILE.gguf")
        try:
            with _no_extra_buffer_types(llama_cpp):
                # every layer on the GPU when llama-cpp-python was built with one (CUDA, Metal …), else CPU
                gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
                self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context_length or 0, n_threads=threads,
                                           n_threads_batch=threads, logits_all=all_logits, n_gpu_layers=gpu_layers,
                                           type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp cannot load {path}: {exc}") from exc
        self.path = path
        self.metadata: dict[str, str] = dict(self.llm.metadata)
        self.precision = gguf_precision(self.metadata)
        self.vocab_size = int(self.llm.n_vocab())
        self.context_length = int(self.llm.n_ctx())
        self.config = _Config(self.vocab_size)  # what replay reads of a model
        eos = {int(self.llm.token_eos())}
        if (eot := self.metadata.get("tokenizer.ggml.eot_token_id")) is not None:
            eos.add(int(eot))
        self._eos = frozenset(t for t in eos if t >= 0)
        self.eos = min(self._eos) if self._eos else None
        self._bos = int(self.llm.token_bos())
        self._add_bos = self.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true" and self._bos >= 0
        self._template = self.metadata.get("tokenizer.chat_template")
        self.lock = threading.Lock()  # one context: one evaluation at a time

    # -- the Tokenizer protocol -------------------------------------------------------------------------

    @property
    def eos_tokens(self) -> frozenset[int]:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def token_bytes(self, token: int) -> bytes:
        return b"" if token in self._eos else self.llm.detokenize([token], special=False)

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="backslashreplace")

    def chat_prompt(self, messages: list[tuple[str, str]]) -> list[int]:
        if not self._template:
            raise RequestError("this GGUF has no chat template; use /v1/completions with a plain prompt",
                               param="messages", code="no_chat_template")
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        text = env.from_string(self._template).render(
            messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=True,
            bos_token=self.token_text(self._bos) if self._bos >= 0 else "",
            eos_token=self.token_text(self.eos) if self.eos is not None else "",
        )
        return self.encode(text)

    def completion_prompt(self, prompt: str) -> list[int]:
        return ([self._bos] if self._add_bos else []) + self.encode(prompt)

    def stream_decoder(self) -> _ByteStream:
        return _ByteStream(self)

    # -- logits -----------------------------------------------------------------------------------------

    def evaluate(self, ids: list[int]) -> None:
        """Run `ids` after what the context already holds (call `reset` first for a fresh sequence)."""
        self.llm.eval(ids)

    def reset(self) -> None:
        self.llm.reset()

    def last_logits(self) -> torch.Tensor:
        """The last evaluated position's logits, read from llama.cpp (a copy: the next eval overwrites them)."""
        llama_cpp = _llama_cpp()
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.vocab_size,))
        return torch.from_numpy(np.array(row, dtype=np.float32))

    def __call__(self, input_ids: torch.Tensor, past_key_values: _Prefix | None = None,
                 use_cache: bool = False) -> _Output:
        """Every position's logits for each row of `input_ids` (after the tokens `past_key_values` holds), as
        `model(input_ids=…, past_key_values=…)` of a transformers model: what `verify.replay` calls (needs
        all_logits). The "cache" is the prefix's token ids; llama.cpp keeps its KV state, so rows that
        continue the prefix the context already holds evaluate only their own tokens."""
        prefix = past_key_values.ids if past_key_values is not None else []
        out = []
        with self.lock:
            for row in input_ids.tolist():
                ids = prefix + [int(t) for t in row]
                held = self.llm.n_tokens
                if prefix and held >= len(prefix) and self.llm.input_ids[: len(prefix)].tolist() == prefix:
                    self.llm.n_tokens = len(prefix)  # keep the prefix's KV state, drop the rest
                else:
                    self.reset()
                    if prefix:
                        self.evaluate(prefix)
                self.evaluate(ids[len(prefix):])
                out.append(np.array(self.llm.scores[len(prefix): len(ids)], dtype=np.float32))
        return _Output(torch.from_numpy(np.stack(out)), _Prefix(prefix + [int(t) for t in input_ids[0].tolist()]))

    def forward(self, input_ids: torch.Tensor, past_key_values: _Prefix | None = None,
                use_cache: bool = False) -> _Output:
        return self(input_ids, past_key_values, use_cache)


@dataclass
class _Prefix:
    """What stands in for a transformers KV cache in replay: the token ids already evaluated."""

    ids: list[int]

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass  # every row continues the same prefix


@dataclass(frozen=True)
class _Output:
    logits: torch.Tensor
    past_key_values: _Prefix

    def __getitem__(self, key: str) -> _Prefix:
        if key != "past_key_values":
            raise KeyError(key)
        return self.past_key_values


@contextmanager
def _no_extra_buffer_types(llama_cpp: Any) -> Iterator[None]:
    """Load models without llama.cpp's extra CPU buffer types (weight repacking, AMX): its AMX matrix
    multiply crashes the process on Sapphire-Rapids-class CPUs (ggml-org/llama.cpp#20824, seen on the
    project's machine with a Q8_0 file). llama-cpp-python does not expose `use_extra_bufts`, so its
    default model parameters are wrapped while `Llama` is built."""
    low = llama_cpp.llama_cpp
    with _LOAD_LOCK:
        default = low.llama_model_default_params

        def params() -> Any:
            p = default()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = params
        try:
            yield
        finally:
            low.llama_model_default_params = default


_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Config:
    vocab_size: int


class _ByteStream:
    """Text deltas from llama.cpp token bytes, never splitting a UTF-8 character."""

    def __init__(self, model: GGUFModel) -> None:
        self._model = model
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._dec.decode(self._model.token_bytes(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class LlamaCppEngine:
    name = "llamacpp"

    def __init__(self, path: Path, *, model_cid: str, model_name: str, threads: int | None = None,
                 context_length: int | None = None) -> None:
        self.model = GGUFModel(path, threads=threads, context_length=context_length)
        self.tokenizer = self.model
        self.model_cid = model_cid
        self.model_name = model_name
        self.precision = self.model.precision
        self.context_length = self.model.context_length
        self.vocab_size = self.model.vocab_size
        self._stopping = False

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self._stopping = True
        with self.model.lock:  # wait for the running generation to notice
            pass

    def token_text(self, token: int) -> str:
        return self.model.token_text(token)

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        return prompt_ids(self.model, request)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Generation]:
        prompt = self.prompt_tokens(request)
        check_request(request, prompt, vocab_size=self.vocab_size, context_length=self.context_length)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent | Generation | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: TokenEvent | Generation | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def run() -> None:
            try:
                with self.model.lock:
                    self._generate(request, prompt, emit, cancelled)
            except Exception as exc:  # the error reaches the request, not the event loop
                log.exception("llama.cpp generation failed")
                emit(EngineError(f"generation failed: {exc}"))

        thread = threading.Thread(target=run, name="agora-llamacpp", daemon=True)
        thread.start()
        async with aclosing(drain(queue, cancelled)) as events:  # closed at once when the consumer stops
            async for item in events:
                yield item

    def _generate(self, req: GenerationRequest, prompt: list[int], emit, cancelled: threading.Event) -> None:
        m, s = self.model, req.sampling
        decoder = m.stream_decoder()
        for token in req.prefix_tokens:  # the text state where the first provider left off
            decoder.feed(token)
        gen = Generation(prompt_tokens=len(prompt))
        m.reset()
        m.evaluate(prompt + list(req.prefix_tokens))
        pending = ""  # held back while it could start a stop string
        while not cancelled.is_set():
            if self._stopping:
                emit(EngineError("the engine stopped", hint="retry on another provider"))
                return
            logits = m.last_logits()
            token = choose_token(logits, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                                 request_id=req.request_id, position=len(req.prefix_tokens) + len(gen.tokens))
            logprobs = torch.log_softmax(logits, dim=-1)
            top_v, top_i = torch.topk(logprobs, min(max(req.top_logprobs, RECEIPT_TOP_K), m.vocab_size))
            top = [(int(i), float(v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
            gen.tokens.append(token)
            gen.logprobs.append(float(logprobs[token]))
            gen.top.append(top)
            finish = "stop" if token in m.eos_tokens else "length" if len(gen.tokens) >= s.max_tokens else None
            delta = "" if token in m.eos_tokens else decoder.feed(token)
            if finish:
                delta += decoder.flush()
            text, pending, stopped = cut_at_stop(pending + delta, s.stop, final=finish is not None)
            gen.text += text
            emit(TokenEvent(text=text, token=token, logprob=gen.logprobs[-1], top=tuple(top)))
            if stopped or finish:
                gen.finish_reason = finish if finish and not stopped else "stop"
                gen.completion_tokens = len(gen.tokens)
                emit(gen)
                return
            m.evaluate([token])

