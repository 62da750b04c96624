"""Built-in engine: a transformers causal LM with KV-cache decoding and step-level batching.

One worker thread owns the model. Each step it prefills the newly admitted requests together (one
left-padded forward pass, chunked when long) and then decodes one token for every active sequence
in a single batched forward pass, so a request never waits for another to finish. The KV cache is
preallocated per sequence row and updated in place: joining or leaving the batch moves one row,
never rebuilds the cache. Tokens reach the event loop once per step, not once per token, and for a
non-streamed answer (`request.stream` False) not at all between the first token and the Generation: the
consumer would only wake to discard them, taking the GIL from this thread each step.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import threading
import time

from contextlib import aclosing
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from agoranet.core.errors import EngineError, ModelError
from agoranet.engine.base import Generation, GenerationRequest, TokenEvent, check_request, prompt_ids, drain
from agoranet.engine.tokenizer import TextDecoder, load_tokenizer
from agoranet.verify.rule import choose_tokens

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RECEIPT_TOP_K = 5  # receipts always carry at least this many alternatives for verifiers
PREFILL_CHUNK = 2048  # prompt tokens (summed over the admitted rows) per prefill forward pass
# An idle engine that receives a request waits for the rest of a burst (another arrival within ADMIT_GAP_S,
# ADMIT_MAX_S at most) so the burst shares one prefill pass, and the HTTP event loop parses it while the
# engine's threads are not holding the cores. Costs a lone request ADMIT_GAP_S.
ADMIT_GAP_S = 0.002
ADMIT_MAX_S = 0.05


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


@dataclass
class _Sequence:
    request: GenerationRequest
    prompt: list[int]
    loop: asyncio.AbstractEventLoop  # the requester's event loop, where `queue` is read
    queue: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    pending_text: str = ""  # held back while it could be the start of a stop string
    decoder: TextDecoder | None = None
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
        self.tokenizer = load_tokenizer(model_dir)
        self._eos = self.tokenizer.eos_tokens
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
        self.prefill_chunk = PREFILL_CHUNK
        self._active: list[_Sequence] = []  # row i of the cache belongs to _active[i]
        self._starts: list[int] = []  # first cache column of each row's tokens
        self._end = 0  # the column the next decode step writes, shared by all rows
        self._cache = _SlotCache()
        self._outbox: list[tuple[_Sequence, object]] = []  # events of this step, handed over in _flush
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
        return prompt_ids(self.tokenizer, request)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Generation]:
        prompt = self.prompt_tokens(request)
        check_request(request, prompt, vocab_size=int(self.model.config.vocab_size), context_length=self.context_length)
        queue: asyncio.Queue[TokenEvent | Generation | BaseException] = asyncio.Queue()
        seq = _Sequence(request=request, prompt=prompt, loop=asyncio.get_running_loop(), queue=queue,
                        decoder=self.tokenizer.stream_decoder())
        self._replay_prefix(seq)
        with self._wake:
            if self._stopping:
                raise EngineError("the engine is shutting down", hint="retry on another provider")
            self._waiting.append(seq)
            self._wake.notify()
        async with aclosing(drain(queue, seq.cancelled)) as events:  # closed at once when the consumer stops
            async for item in events:
                yield item

    def _replay_prefix(self, seq: _Sequence) -> None:
        """Bring the text state (partial UTF-8, text held back for stop strings) to where the engine
        that generated the prefix left it, so a continuation streams exactly the text it would have."""
        for token in seq.request.prefix_tokens:
            if token not in self._eos:
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
                if not self._active:
                    self._await_burst()
                admitted = []
                while self._waiting and len(self._active) + len(admitted) < self.max_batch:
                    seq = self._waiting.popleft()
                    if not seq.cancelled.is_set():
                        admitted.append(seq)
            try:
                if admitted:
                    self._prefill(admitted)
                    self._drop_finished()
                if self._active:
                    self._decode_step()
                    self._drop_finished()
            except Exception as exc:  # never let one bad step kill the engine thread
                log.exception("engine step failed")
                for seq in self._active + admitted:
                    if seq.finished is None:
                        seq.finished = "error"
                        self._outbox.append((seq, EngineError(f"generation failed: {exc}")))
                self._active, self._starts, self._end = [], [], 0
            self._flush()
        for seq in self._active + list(self._waiting):
            self._outbox.append((seq, EngineError("the engine stopped", hint="retry on another provider")))
        self._flush()

    def _await_burst(self) -> None:
        """Idle, with a request waiting: wait (holding `_wake`'s lock only between waits) while more keep arriving
        less than ADMIT_GAP_S apart, up to ADMIT_MAX_S or a full batch."""
        deadline = time.monotonic() + ADMIT_MAX_S
        seen = len(self._waiting)
        while seen < self.max_batch and not self._stopping:
            left = min(ADMIT_GAP_S, deadline - time.monotonic())
            if left <= 0:
                return
            self._wake.wait(left)
            if len(self._waiting) == seen:  # none arrived within the gap: the burst is over
                return
            seen = len(self._waiting)

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop per step, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for seq, item in self._outbox:
            by_loop.setdefault(seq.loop, []).append((seq.queue, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Prefill newly admitted sequences together: one left-padded forward pass per chunk, written
        straight into their rows of the cache, right-aligned with the running batch's last column."""
        ids = [s.prompt + list(s.request.prefix_tokens) for s in seqs]
        width = max(len(x) for x in ids)
        n, m = len(self._active), len(seqs)
        self._make_room(rows=n + m, width=width)
        base = self._end - width
        starts = [self._end - len(x) for x in ids]
        tokens = torch.tensor([[0] * (width - len(x)) + x for x in ids])
        positions = torch.tensor([[0] * (width - len(x)) + list(range(len(x))) for x in ids])
        chunk = max(1, self.prefill_chunk // m)
        start_col = torch.tensor(starts)[:, None, None]
        logits = None
        for c0 in range(0, width, chunk):
            c1 = min(width, c0 + chunk)
            keys = torch.arange(base, base + c1)[None, None, :]
            queries = torch.arange(base + c0, base + c1)[None, :, None]
            # each key must be the row's own and not in the future; a padding query sees itself (never NaN)
            allowed = ((keys >= start_col) & (keys <= queries)) | (keys == queries)
            self._cache.window(rows=(n, n + m), read_from=base, write_at=base + c0)
            out = self.model(
                input_ids=tokens[:, c0:c1], position_ids=positions[:, c0:c1], attention_mask=self._additive(allowed),
                use_cache=True, logits_to_keep=1, **{self._cache_kw: self._cache},
            )
            logits = out.logits[:, -1]
        for seq, x in zip(seqs, ids):
            seq.length = len(x)
        self._active.extend(seqs)
        self._starts.extend(starts)
        self._accept(seqs, logits)

    def _decode_step(self) -> None:
        self._make_room(rows=len(self._active), width=0)
        n, end = len(self._active), self._end
        lo = min(self._starts)
        input_ids = torch.tensor([[s.tokens[-1]] for s in self._active])
        positions = torch.tensor([[s.length - 1] for s in self._active])
        allowed = torch.arange(lo, end + 1)[None, None, None, :] >= torch.tensor(self._starts)[:, None, None, None]
        self._cache.window(rows=(0, n), read_from=lo, write_at=end)
        out = self.model(
            input_ids=input_ids, attention_mask=self._additive(allowed[:, 0]), position_ids=positions,
            use_cache=True, **{self._cache_kw: self._cache},
        )
        self._end = end + 1
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, n)
        live = [i for i, s in enumerate(self._active) if not s.cancelled.is_set()]
        self._accept([self._active[i] for i in live], out.logits[live, -1])

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """A [batch, 1, q, k] additive mask in the model's dtype (what both sdpa and eager attention take)."""
        zero = torch.zeros((), dtype=self.model.dtype)
        return torch.where(allowed, zero, torch.finfo(self.model.dtype).min)[:, None]

    def _accept(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Choose each row's next token by the replay rule, record it, stream its text, maybe finish."""
        if not seqs:
            return
        logits = logits.float()
        chosen = choose_tokens(
            logits, temperatures=[s.request.sampling.temperature for s in seqs],
            top_ps=[s.request.sampling.top_p for s in seqs], seeds=[s.request.sampling.seed for s in seqs],
            request_ids=[s.request.request_id for s in seqs],
            positions=[len(s.request.prefix_tokens) + len(s.tokens) for s in seqs],
        )
        logprobs = torch.log_softmax(logits, dim=-1)
        k = min(max(max(s.request.top_logprobs for s in seqs), RECEIPT_TOP_K), logprobs.shape[-1])
        top_v, top_i = torch.topk(logprobs, k)
        chosen_lp = logprobs.gather(1, torch.tensor(chosen)[:, None])[:, 0].tolist()
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for row, seq in enumerate(seqs):
            req = seq.request
            width = max(req.top_logprobs, RECEIPT_TOP_K)
            token = chosen[row]
            top = list(zip(top_i[row][:width], top_v[row][:width]))
            seq.tokens.append(token)
            seq.logprobs.append(chosen_lp[row])
            seq.top.append(top)
            seq.length += 1
            delta = "" if token in self._eos else seq.decoder.feed(token)
            if token in self._eos:
                seq.finished = "stop"
            elif len(seq.tokens) >= req.sampling.max_tokens:
                seq.finished = "length"
            visible = self._release_text(seq, delta)
            if req.stream or len(seq.tokens) == 1:  # a non-streamed answer waits for the Generation only
                self._outbox.append(
                    (seq, TokenEvent(text=visible, token=token, logprob=chosen_lp[row], top=tuple(top)))
                )
            if seq.finished is not None:
                self._outbox.append((seq, Generation(
                    prompt_tokens=len(seq.prompt), tokens=seq.tokens, logprobs=seq.logprobs, top=seq.top,
                    text=seq.text, finish_reason=seq.finished, completion_tokens=len(seq.tokens),
                )))

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

    # -- cache layout ---------------------------------------------------------------------------------

    def _make_room(self, *, rows: int, width: int) -> None:
        """Make the cache hold `rows` rows and the shared end column ≥ width with one free column after it.

        Live rows only move when they must: right when a longer prompt joins than there are columns
        before the end, left (to column 0) when the buffer's last column is reached; the buffer grows
        (doubling, up to the context length) only when even that leaves no room."""
        if not self._active:
            self._end = 0
        new_end = max(self._end, width)
        if new_end + 1 > self._cache.cols and self._active:
            new_end = max(self._end - min(self._starts), width)  # compact: the oldest live column goes to 0
        if new_end != self._end and self._active:
            shift = new_end - self._end
            self._cache.reserve(rows, new_end + 1, limit=self.context_length + 1)
            self._cache.shift(len(self._active), min(self._starts), self._end, shift)
            self._starts = [s + shift for s in self._starts]
        self._end = new_end
        self._cache.reserve(rows, new_end + 1, limit=self.context_length + 1)

    def _drop_finished(self) -> None:
        """Free the rows of finished or cancelled sequences by moving the last rows into them."""
        i = 0
        while i < len(self._active):
            seq = self._active[i]
            if seq.finished is None and not seq.cancelled.is_set():
                i += 1
                continue
            last = len(self._active) - 1
            if i != last:
                self._cache.copy_row(last, i, self._starts[last], self._end)
                self._active[i], self._starts[i] = self._active[last], self._starts[last]
            self._active.pop()
            self._starts.pop()


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class _SlotCache:
    """A KV cache preallocated per layer as [rows, kv heads, columns, head dim], updated in place.

    Each live sequence owns a row; its tokens sit in columns [start, end) — all rows end at the same
    column, so one decode step writes one column for everyone. `window` says which rows and columns
    the next forward pass writes and reads; attention masks hide other rows' padding. Joining or
    leaving the batch copies one row, never the whole cache."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.rows = self.cols = 0
        self._rows = (0, 0)
        self._read_from = self._write_at = 0

    def window(self, *, rows: tuple[int, int], read_from: int, write_at: int) -> None:
        self._rows, self._read_from, self._write_at = rows, read_from, write_at

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """What attention layers call: store this pass's keys/values, return everything the window reads."""
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is None:
            shape = (self.rows, key.shape[1], self.cols, key.shape[3])
            self.keys[layer_idx] = key.new_zeros(shape)
            self.values[layer_idx] = value.new_zeros(shape)
        (r0, r1), w = self._rows, self._write_at
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[r0:r1, :, w : w + key.shape[2]] = key
        v[r0:r1, :, w : w + key.shape[2]] = value
        end = w + key.shape[2]
        return k[r0:r1, :, self._read_from : end], v[r0:r1, :, self._read_from : end]

    def reserve(self, rows: int, cols: int, *, limit: int) -> None:
        """Grow the buffers (doubling, columns capped at `limit`) so they hold rows × cols."""
        if rows <= self.rows and cols <= self.cols:
            return
        new_rows = max(rows, min(2 * self.rows, 1 << 16)) if rows > self.rows else self.rows
        new_cols = max(cols, min(2 * self.cols, limit)) if cols > self.cols else self.cols
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if t is not None:
                    grown = t.new_zeros(new_rows, t.shape[1], new_cols, t.shape[3])
                    grown[: self.rows, :, : self.cols] = t
                    store[i] = grown
        self.rows, self.cols = new_rows, new_cols

    def shift(self, rows: int, lo: int, hi: int, by: int) -> None:
        """Move columns [lo, hi) of the first `rows` rows by `by` columns."""
        for store in (self.keys, self.values):
            for t in store:
                if t is not None:
                    t[:rows, :, lo + by : hi + by] = t[:rows, :, lo:hi].clone()

    def copy_row(self, src: int, dst: int, lo: int, hi: int) -> None:
        for store in (self.keys, self.values):
            for t in store:
                if t is not None:
                    t[dst, :, lo:hi] = t[src, :, lo:hi]
