"""Built-in engine: a transformers causal LM with KV-cache decoding and step-level batching.

One worker thread owns the model. Each step it admits waiting requests (one prefill each) and
then decodes one token for every active sequence in a single batched forward pass, so a request
never waits for another to finish. Sequences of different lengths share the batch through left
padding; the padded cache is rebuilt only when the batch's membership changes.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import threading

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

from agoranet.core.errors import EngineError, ModelError, RequestError
from agoranet.engine.base import Generation, GenerationRequest, TokenEvent
from agoranet.engine.tokenizer import ByteTokenizer, StreamDecoder
from agoranet.verify.rule import choose_token

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RECEIPT_TOP_K = 5  # receipts always carry at least this many alternatives for verifiers


def load_causal_lm(model_dir: Path, precision: str) -> torch.nn.Module:
    """Load a local transformers model in the dtype of a precision class (weights upcast as needed)."""
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}")
    if not (model_dir / "config.json").exists():
        raise ModelError(f"{model_dir} holds no model (config.json missing)", hint="pass a model directory or CID")
    transformers.logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=PRECISIONS[precision])
    except Exception as exc:
        raise ModelError(f"could not load the model in {model_dir}: {exc}") from exc
    return model.eval()


def render_prompt(tokenizer: ByteTokenizer, request: GenerationRequest) -> list[int]:
    """The prompt token ids of a request: what this engine generates from and what a verifier replays."""
    if request.kind == "chat":
        return tokenizer.chat_prompt(list(request.messages))
    return tokenizer.completion_prompt(request.prompt)


@dataclass
class _Sequence:
    request: GenerationRequest
    prompt: list[int]
    emit: object  # callable(event | None) run on the event loop thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    pending_text: str = ""  # held back while it could be the start of a stop string
    decoder: StreamDecoder | None = None
    finished: str | None = None
    length: int = 0  # real tokens in the cache (prompt + prefix + generated so far)


class TransformersEngine:
    name = "transformers"

    def __init__(
        self, model_dir: Path, *, model_cid: str, model_name: str = "agora-tiny", precision: str = "fp32",
        max_batch: int = 16, threads: int | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.model_cid = model_cid
        self.model_name = model_name
        self.precision = precision
        self.max_batch = max_batch
        self.tokenizer = ByteTokenizer.from_dir(model_dir)
        if threads:
            torch.set_num_threads(threads)
        self.model = load_causal_lm(model_dir, precision)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(self.model.config.vocab_size)
        # transformers renamed past_key_values to cache (5.x); speak whichever this version knows.
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._active: list[_Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self.steps = 0  # batched decode steps run, for metrics and tests
        self.max_batch_seen = 0

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="agora-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def token_text(self, token: int) -> str:
        return self.tokenizer.token_text(token)

    # -- requests -------------------------------------------------------------------------------------

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        return render_prompt(self.tokenizer, request)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Generation]:
        vocab = int(self.model.config.vocab_size)
        if (bad := next((t for t in request.prefix_tokens if not 0 <= t < vocab), None)) is not None:
            raise RequestError(f"agora.prefix_tokens holds {bad}, not a token id of this model (0 to {vocab - 1})",
                               param="agora.prefix_tokens", code="invalid_token")
        prompt = self.prompt_tokens(request)
        total = len(prompt) + len(request.prefix_tokens) + request.sampling.max_tokens
        if total > self.context_length:
            raise RequestError(
                f"this model's context is {self.context_length} tokens; the prompt takes {len(prompt)} and "
                f"max_tokens asks for {request.sampling.max_tokens} more",
                param="max_tokens", code="context_length_exceeded",
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent | Generation | BaseException] = asyncio.Queue()

        def emit(item: TokenEvent | Generation | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        seq = _Sequence(request=request, prompt=prompt, emit=emit, decoder=StreamDecoder(self.tokenizer))
        self._replay_prefix(seq)
        with self._wake:
            if self._stopping:
                raise EngineError("the engine is shutting down", hint="retry on another provider")
            self._waiting.append(seq)
            self._wake.notify()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Generation):
                    return
        finally:
            seq.cancelled.set()

    def _replay_prefix(self, seq: _Sequence) -> None:
        """Bring the text state (partial UTF-8, text held back for stop strings) to where the engine
        that generated the prefix left it, so a continuation streams exactly the text it would have."""
        for token in seq.request.prefix_tokens:
            if token != self.tokenizer.eos:
                self._release_text(seq, seq.decoder.feed(token))
        seq.text, seq.finished = "", None  # the prefix's text was already sent by someone else

    @property
    def batch_size(self) -> int:
        """Sequences in the running batch now (read from other threads; a stale count is fine for metrics)."""
        return len(self._active)

    # -- worker thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._active:
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = []
                while self._waiting and len(self._active) + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
            try:
                for seq in admitted:
                    if not seq.cancelled.is_set():
                        self._prefill(seq)
                self._drop_finished()
                if self._active:
                    self._decode_step()
                    self._drop_finished()
            except Exception as exc:  # never let one bad step kill the engine thread
                log.exception("engine step failed")
                for seq in self._active + admitted:
                    if seq.finished is None:
                        seq.finished = "error"
                        seq.emit(EngineError(f"generation failed: {exc}"))
                self._active, self._cache, self._mask = [], None, None
        for seq in self._active + list(self._waiting):
            seq.emit(EngineError("the engine stopped", hint="retry on another provider"))

    def _prefill(self, seq: _Sequence) -> None:
        ids = seq.prompt + list(seq.request.prefix_tokens)
        seq.length = len(ids)
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
        self._accept(seq, out.logits[0, -1])
        if seq.finished is None:
            self._join(seq, out[self._cache_kw])

    def _decode_step(self) -> None:
        assert self._cache is not None and self._mask is not None
        input_ids = torch.tensor([[s.tokens[-1]] for s in self._active])
        positions = torch.tensor([[s.length - 1] for s in self._active])
        self._mask = torch.cat([self._mask, torch.ones(len(self._active), 1, dtype=self._mask.dtype)], dim=1)
        out = self.model(
            input_ids=input_ids, attention_mask=self._mask, position_ids=positions, use_cache=True,
            **{self._cache_kw: self._cache},
        )
        self._cache = out[self._cache_kw]
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(self._active))
        for i, seq in enumerate(self._active):
            if not seq.cancelled.is_set():
                self._accept(seq, out.logits[i, -1])

    def _accept(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Choose the next token by the replay rule, record it, stream its text, maybe finish."""
        req, params = seq.request, seq.request.sampling
        logits = logits.float()
        position = len(req.prefix_tokens) + len(seq.tokens)
        token = choose_token(
            logits, temperature=params.temperature, top_p=params.top_p, seed=params.seed,
            request_id=req.request_id, position=position,
        )
        logprobs = torch.log_softmax(logits, dim=-1)
        k = min(max(req.top_logprobs, RECEIPT_TOP_K), logprobs.shape[-1])
        top_v, top_i = torch.topk(logprobs, k)
        top = [(int(i), float(v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
        seq.tokens.append(token)
        seq.logprobs.append(float(logprobs[token]))
        seq.top.append(top)
        seq.length += 1
        delta = "" if token == self.tokenizer.eos else seq.decoder.feed(token)
        if token == self.tokenizer.eos:
            seq.finished = "stop"
        elif len(seq.tokens) >= params.max_tokens:
            seq.finished = "length"
        visible = self._release_text(seq, delta)
        seq.emit(TokenEvent(text=visible, token=token, logprob=seq.logprobs[-1], top=tuple(top[: req.top_logprobs])))
        if seq.finished is not None:
            seq.emit(Generation(
                prompt_tokens=len(seq.prompt), tokens=seq.tokens, logprobs=seq.logprobs, top=seq.top,
                text=seq.text, finish_reason=seq.finished, completion_tokens=len(seq.tokens),
            ))

    def _release_text(self, seq: _Sequence, delta: str) -> str:
        """Stream text, holding back any tail that might begin a stop string; cut at a stop string."""
        stops = seq.request.sampling.stop
        if seq.finished is not None:
            delta += seq.decoder.flush()
        if not stops:
            seq.text += delta
            return delta
        pending = seq.pending_text + delta
        cut = min((pending.find(s) for s in stops if s and s in pending), default=-1)
        if cut >= 0:
            seq.finished = "stop"
            pending = pending[:cut]
            seq.pending_text = ""
            seq.text += pending
            return pending
        hold = 0 if seq.finished is not None else max(
            (n for s in stops for n in range(1, len(s)) if pending.endswith(s[:n])), default=0
        )
        out, seq.pending_text = pending[: len(pending) - hold], pending[len(pending) - hold :]
        seq.text += out
        return out

    # -- batch bookkeeping ----------------------------------------------------------------------------

    def _join(self, seq: _Sequence, cache: DynamicCache) -> None:
        new_kv = _cache_tensors(cache)
        new_mask = torch.ones(1, new_kv[0][0].shape[2], dtype=torch.long)
        if not self._active:
            self._active, self._mask = [seq], new_mask
            self._cache = _make_cache(new_kv, self.model.config)
            return
        old_kv = _cache_tensors(self._cache)
        width = max(old_kv[0][0].shape[2], new_kv[0][0].shape[2])
        merged = [
            tuple(torch.cat([_left_pad(a, width), _left_pad(b, width)], dim=0) for a, b in zip(old, new))
            for old, new in zip(old_kv, new_kv)
        ]
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(new_mask, width)], dim=0)
        self._cache = _make_cache(merged, self.model.config)
        self._active.append(seq)

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._active) if s.finished is None and not s.cancelled.is_set()]
        if len(keep) == len(self._active):
            return
        if not keep:
            self._active, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep)
        mask = self._mask.index_select(0, index)
        first = int((mask.sum(dim=0) > 0).nonzero()[0])  # drop columns that are padding for everyone left
        kv = [tuple(t.index_select(0, index)[:, :, first:] for t in layer) for layer in _cache_tensors(self._cache)]
        self._active = [self._active[i] for i in keep]
        self._mask = mask[:, first:]
        self._cache = _make_cache(kv, self.model.config)


def _cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56


def _make_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], config) -> DynamicCache:
    return DynamicCache(ddp_cache_data=kv, config=config)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - t.shape[2]
    if pad == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], pad, t.shape[3]), t], dim=2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - mask.shape[1]
    return mask if pad == 0 else torch.cat([mask.new_zeros(mask.shape[0], pad), mask], dim=1)


