"""vLLM engine: sell a vLLM server's output with receipts any verifier holding the model replays.

vLLM (its OpenAI-compatible server) computes the logits; the token is chosen by Agora's public rule,
which runs inside vLLM as a logits processor (`agoranet.engine.vllm_rule:AgoraRule`). This engine
holds the same model directory as vLLM (for the tokenizer, the chat template and the model's CID),
renders every prompt to token ids itself — exactly as the built-in engine does, so the canonical
request binds the prompt's ids — and sends them to vLLM's `/v1/completions` with the rule's arguments
(`vllm_xargs`), asking for the token ids (`return_token_ids`, `return_tokens_as_token_ids`) and the
model's own top-k logprobs. A failover continuation is the prompt's ids followed by the prefix's.

Start the server first, where vLLM's Python can import this package:

    PYTHONPATH=…/agoranet/src python -m vllm.entrypoints.openai.api_server --model DIR \\
        --served-model-name NAME --dtype float32 --logits-processors agoranet.engine.vllm_rule:AgoraRule
    agora provide --engine vllm --model DIR --upstream http://127.0.0.1:8000 --upstream-model NAME

`start()` proves the server runs the processor (a probe forces two chosen tokens) and reports raw
logprobs. The receipt's precision class is the one the operator declares (`--precision`, fp32 by
default): it must be the dtype vLLM was started with, since verifiers judge by that class's tolerances.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from agoranet.core.errors import EngineError, ModelError, RequestError
from agoranet.engine.base import Generation, GenerationRequest, TokenEvent, check_request, prompt_ids, cut_at_stop
from agoranet.engine.tokenizer import load_tokenizer
from agoranet.engine.upstream import openai_client
from agoranet.verify.rules import RULE_DIGEST
from agoranet.wire.openai import error_message
from agoranet.wire.sse import StreamTruncated, sse_payloads

log = logging.getLogger(__name__)

VLLM_ENGINE = "vllm"
RECEIPT_TOP_K = 5  # receipts always carry at least this many alternatives, as the built-in engine's
PROCESSOR = "agoranet.engine.vllm_rule:AgoraRule"
_HINT = f"start vLLM with --logits-processors {PROCESSOR} (agoranet importable by its Python)"


class VLLMEngine:
    name = VLLM_ENGINE

    def __init__(self, base_url: str, model_dir: Path, *, model_cid: str, model_name: str,
                 upstream_model: str | None = None, precision: str = "fp32", api_key: str | None = None,
                 timeout: float = 300.0) -> None:
        if not (model_dir / "config.json").exists():
            raise ModelError(f"{model_dir} holds no model (config.json missing)",
                             hint="pass --model with the model directory (or CID) vLLM serves")
        self.model_dir = model_dir
        self.model_cid = model_cid
        self.model_name = model_name
        self.upstream_model = upstream_model or model_name
        self.precision = precision
        config = json.loads((model_dir / "config.json").read_text())
        self.vocab_size = int(config["vocab_size"])
        self.context_length = int(config.get("max_position_embeddings", 2048))  # and vLLM's max_model_len
        self.tokenizer = load_tokenizer(model_dir)
        self._eos = self.tokenizer.eos_tokens
        self.base_url, self._client = openai_client(base_url, api_key, timeout)

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            r = await self._client.get("/models")
            r.raise_for_status()
            served = {m["id"]: m for m in r.json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"the vLLM server at {self.base_url} does not answer GET /models: {exc}",
                              hint="start it first, or check --upstream") from exc
        if self.upstream_model not in served:
            raise EngineError(f"the vLLM server at {self.base_url} serves {sorted(served)}, not "
                              f"{self.upstream_model!r}", hint="pass --upstream-model with one of those names")
        if isinstance(limit := served[self.upstream_model].get("max_model_len"), int):
            self.context_length = min(self.context_length, limit)
        await self._probe()

    async def _probe(self) -> None:
        """Force two different tokens through the processor: the server runs it, and its logprobs are raw."""
        prompt = self.tokenizer.completion_prompt("def")[:8] or [0]
        for force in (self.vocab_size // 3, self.vocab_size // 3 + 1):
            body = {"model": self.upstream_model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                    "logprobs": 2, "return_tokens_as_token_ids": True, "return_token_ids": True,
                    "vllm_xargs": {"agora_force": force, "agora_rule": RULE_DIGEST}}
            try:
                r = await self._client.post("/completions", json=body)
            except httpx.HTTPError as exc:
                raise EngineError(f"lost the vLLM server at {self.base_url}: {exc}") from exc
            if r.status_code >= 400:
                message = _message(r)
                raise EngineError(f"the vLLM server at {self.base_url} refused the rule's probe: {message}",
                                  hint=None if "sampling rule" in message else _HINT)
            choice = r.json()["choices"][0]
            tokens = choice.get("token_ids") or []
            if tokens != [force]:
                raise EngineError(f"the vLLM server at {self.base_url} does not apply Agora's sampling rule "
                                  f"(asked to force token {force}, it sampled {tokens})", hint=_HINT)
            top = (choice.get("logprobs") or {}).get("top_logprobs") or [{}]
            if sum(v > float("-inf") for v in (top[0] or {}).values()) < 2:
                raise EngineError(f"the vLLM server at {self.base_url} reports processed logprobs, not the model's",
                                  hint="start vLLM with --logprobs-mode raw_logprobs (its default)")

    async def stop(self) -> None:
        await self._client.aclose()

    # -- requests -----------------------------------------------------------------------------------------

    def token_text(self, token: int) -> str:
        return self.tokenizer.token_text(token)

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        return prompt_ids(self.tokenizer, request)

    def request_body(self, request: GenerationRequest, prompt: list[int]) -> dict[str, Any]:
        """What vLLM is asked: the ids, greedy over the processor's single finite logit, raw top-k logprobs."""
        s = request.sampling
        return {
            "model": self.upstream_model, "prompt": prompt + list(request.prefix_tokens), "max_tokens": s.max_tokens,
            "temperature": 0.0, "top_p": 1.0, "stream": True, "logprobs": max(request.top_logprobs, RECEIPT_TOP_K),
            "return_tokens_as_token_ids": True, "return_token_ids": True,
            "vllm_xargs": {"agora_seed": s.seed, "agora_request_id": request.request_id,
                           "agora_temperature": float(s.temperature), "agora_top_p": float(s.top_p),
                           "agora_prompt_len": len(prompt), "agora_prefix_len": len(request.prefix_tokens),
                           "agora_rule": RULE_DIGEST},
        }

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Generation]:
        prompt = self.prompt_tokens(request)
        s = request.sampling
        check_request(request, prompt, vocab_size=self.vocab_size, context_length=self.context_length)
        width = max(request.top_logprobs, RECEIPT_TOP_K)
        decoder = self.tokenizer.stream_decoder()
        for token in request.prefix_tokens:  # the text state where the first provider left off
            if token not in self._eos:
                decoder.feed(token)
        gen = Generation(prompt_tokens=len(prompt))
        pending = ""  # held back while it could start a stop string
        try:
            async with self._client.stream("POST", "/completions", json=self.request_body(request, prompt)) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise _error(r)
                async for data in sse_payloads(r.aiter_lines()):
                    chunk = json.loads(data)
                    if (error := chunk.get("error")) is not None:
                        raise EngineError(f"vLLM failed mid-stream: {error}")
                    choices = chunk.get("choices") or []
                    if not choices:
                        continue
                    choice = choices[0]
                    for token, logprob, top in _tokens(choice, width):
                        if not 0 <= token < self.vocab_size:
                            raise EngineError(f"vLLM returned token {token}, outside this model's vocabulary")
                        gen.tokens.append(token)
                        gen.logprobs.append(logprob)
                        gen.top.append(top)
                        eos = token in self._eos
                        finish = "stop" if eos else "length" if len(gen.tokens) >= s.max_tokens else None
                        delta = "" if eos else decoder.feed(token)
                        if finish:
                            delta += decoder.flush()
                        text, pending, stopped = cut_at_stop(pending + delta, s.stop, final=finish is not None)
                        gen.text += text
                        yield TokenEvent(text=text, token=token, logprob=logprob, top=tuple(top))
                        if stopped or finish:
                            gen.finish_reason = finish if finish and not stopped else "stop"
                            gen.completion_tokens = len(gen.tokens)
                            yield gen
                            return  # leaving the stream closes it: vLLM aborts the request
                    if choice.get("finish_reason"):  # vLLM stopped on its own (a stop token of its config)
                        text, _, _ = cut_at_stop(pending + decoder.flush(), s.stop, final=True)
                        gen.text += text
                        if text:
                            yield TokenEvent(text=text)
                        gen.finish_reason = "stop" if choice["finish_reason"] == "stop" else "length"
                        gen.completion_tokens = len(gen.tokens)
                        yield gen
                        return
        except StreamTruncated as exc:
            raise EngineError(f"the vLLM server at {self.base_url} cut the stream off", hint="retry") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"the vLLM server at {self.base_url} sent a stream chunk that is not one: {exc}") from exc
        except httpx.HTTPError as exc:
            raise EngineError(f"lost the vLLM server at {self.base_url}: {exc}", hint="check that it is running") from exc
        raise EngineError(f"the vLLM server at {self.base_url} ended the stream without finishing", hint="retry")


def _tokens(choice: dict[str, Any], width: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """(token id, its logprob, the top `width` alternatives) for each token of one streamed choice."""
    ids = choice.get("token_ids") or []
    lp = choice.get("logprobs") or {}
    logprobs, tops, names = lp.get("token_logprobs") or [], lp.get("top_logprobs") or [], lp.get("tokens") or []
    if not (len(ids) == len(logprobs) == len(tops) == len(names)):
        raise ValueError(f"{len(ids)} token ids but {len(logprobs)} logprobs, {len(tops)} top lists: is "
                         "return_token_ids supported (vLLM ≥ 0.10)?")
    out = []
    for token, name, logprob, top in zip(ids, names, logprobs, tops):
        if _token_id(name) != token:
            raise ValueError(f"token {token} is named {name!r} in its logprobs")
        alts = sorted(((_token_id(k), float(v)) for k, v in (top or {}).items()), key=lambda kv: -kv[1])[:width]
        out.append((int(token), float(logprob), alts))
    return out


def _token_id(name: str) -> int:
    """vLLM names tokens `token_id:N` when asked return_tokens_as_token_ids."""
    if not name.startswith("token_id:"):
        raise ValueError(f"token {name!r} is not named by its id: is return_tokens_as_token_ids supported?")
    return int(name.removeprefix("token_id:"))


def _message(r: httpx.Response) -> str:
    try:
        return error_message(r.json()) or r.text[:300]
    except ValueError:
        return r.text[:300]


def _error(r: httpx.Response) -> Exception:
    if 400 <= r.status_code < 500:
        return RequestError(f"vLLM refused the request: {_message(r)}", status=r.status_code, code="upstream_error")
    return EngineError(f"vLLM failed with HTTP {r.status_code}: {_message(r)}")
