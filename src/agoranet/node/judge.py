"""The replay judge: reference models by CID and tolerance tables; signs verdicts and fraud proofs.

It judges one receipt (with its canonical request) by teacher-forced replay, and re-checks the
receipt inside another verifier's fraud proof. The verifier role and `agora verify` both use it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from agoranet.core.errors import AgoraError, RecordError, RequestError
from agoranet.core.identity import Identity
from agoranet.core.records import ReceiptBody, Record, sign_record, verify_record
from agoranet.engine.base import GenerationRequest
from agoranet.engine.models import model_cid, resolve_model
from agoranet.engine.tokenizer import Tokenizer, load_tokenizer
from agoranet.engine.transformers_engine import load_causal_lm, render_prompt
from agoranet.engine.upstream import UPSTREAM_PRECISION
from agoranet.verify.records import ClassTolerance, FailureEvidence, FraudProofBody, TolerancesBody, VerdictBody
from agoranet.verify.replay import (
    ReplayJob, ReplayResult, check_receipts, check_request_binding, prompt_binding, request_mismatch,
)
from agoranet.verify.tolerances import (
    REFERENCE_PRECISION, NoTolerances, default_tolerances, load_tolerances, outside_calibration, tolerance_for,
)
from agoranet.wire.canonical import CanonicalRequest


class UnverifiableReceipt(AgoraError):
    hint = "the verifier needs the receipt's canonical request and the model it names (pass --model DIR)"


class ReceiptTooLong(UnverifiableReceipt):
    hint = "no honest receipt is longer than its model's context; this one is not replayed"


class OutsideCalibration(UnverifiableReceipt):
    hint = "calibrate the class over longer prompts/outputs (`agora verify calibrate --max-tokens N`) to judge it"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Judgement:
    verdict: Record[VerdictBody]
    proof: Record[FraudProofBody] | None
    result: ReplayResult


@dataclass
class Recheck:
    holds: bool  # True: the receipt really breaks the rule
    provider: str
    issuer: str  # the verifier that signed the proof
    detail: str
    result: ReplayResult


class ReplayVerifier:
    """Reference models by CID (loaded at fp32 on first use), tolerance tables, and the judging logic."""

    def __init__(self, identity: Identity, *, models: list[str] | None = None, tolerance_files: list[Path] = (),
                 threads: int | None = 1) -> None:
        self.identity = identity
        self._dirs: dict[str, Path] = {}
        for spec in models or ["agora-tiny"]:
            model_dir, _ = resolve_model(spec)
            self._dirs[model_cid(model_dir)] = model_dir
        self._tables: dict[str, TolerancesBody] = {}
        for cid in self._dirs:
            if (record := default_tolerances(cid)) is not None:
                self._tables[cid] = record.body
        for path in tolerance_files:
            table = load_tolerances(path).body
            self._tables[table.model] = table
        self._loaded: dict[str, tuple[torch.nn.Module, Tokenizer]] = {}
        self._lock = threading.Lock()  # one replay at a time: the model is not re-entrant under torch threads
        self._threads = threads
        if threads:
            torch.set_num_threads(threads)

    def context_length(self, cid: str) -> int:
        """The model's context in tokens, from its config (no load): no honest receipt is longer."""
        if cid not in self._dirs:
            raise UnverifiableReceipt(f"this verifier does not hold model {cid}")
        if self._dirs[cid].is_file():  # a GGUF: llama.cpp reads its context from the file
            with self._lock:
                return int(self._model(cid)[0].context_length)
        try:
            config = json.loads((self._dirs[cid] / "config.json").read_text())
            return int(config.get("max_position_embeddings", 2048))
        except (OSError, ValueError, TypeError) as exc:
            raise UnverifiableReceipt(f"cannot read the context length of model {cid}: {exc}") from exc

    def admissible(self, receipt: Record[ReceiptBody]) -> None:
        """Refuse, before anything is queued, a receipt whose replay could not be bounded: a model this
        verifier lacks, or more tokens than the model's context (no honest receipt has that many), or
        one outside the range its class's tolerances were calibrated over (no honest drift measured there)."""
        body = receipt.body
        context = self.context_length(body.model)
        length = body.prompt_tokens + len(body.prefix_tokens) + len(body.output_tokens)
        if length > context:
            raise ReceiptTooLong(f"receipt {receipt.cid} covers {length} tokens; model {body.model} has a context "
                                 f"of {context}")
        table = self._tables.get(body.model)
        tol = next((c for c in table.classes if c.precision == body.precision), None) if table else None
        if tol is not None and (why := outside_calibration(tol, body)):
            raise OutsideCalibration(f"receipt {receipt.cid} is outside the range its tolerances were calibrated "
                                     f"over: {why}")

    def _model(self, cid: str) -> tuple[torch.nn.Module, Tokenizer]:
        if cid not in self._loaded:
            if cid not in self._dirs:
                raise UnverifiableReceipt(f"this verifier does not hold model {cid}")
            path = self._dirs[cid]
            if path.is_file():  # a GGUF: replayed by llama.cpp with the very file (and quantization) served
                from agoranet.engine.llamacpp_engine import GGUFModel

                gguf = GGUFModel(path, threads=self._threads, all_logits=True)
                self._loaded[cid] = (gguf, gguf)  # type: ignore[assignment]
            else:
                self._loaded[cid] = (load_causal_lm(path, REFERENCE_PRECISION), load_tokenizer(path))
        return self._loaded[cid]

    def tolerances(self, cid: str, precision: str) -> ClassTolerance:
        table = self._tables.get(cid)
        if table is None:
            raise NoTolerances(f"no tolerances for model {cid}")
        return tolerance_for(table, precision)

    def replay(self, receipt: Record[ReceiptBody], request_bytes: bytes) -> tuple[ReplayResult, ClassTolerance]:
        """Check signature and request binding (once each), then replay; raises when the receipt cannot be judged.

        Returns the judgement and the tolerances it was judged by."""
        result = self.replay_many([(receipt, request_bytes)])[0]
        if isinstance(result, AgoraError):
            raise result
        return result

    def replay_many(
        self, items: list[tuple[Record[ReceiptBody], bytes]]
    ) -> list[tuple[ReplayResult, ClassTolerance] | AgoraError]:
        """`replay` for several receipts, those of one model replayed together (batched replay); for each,
        its judgement and tolerances or why it cannot be judged."""
        out: list[tuple[ReplayResult, ClassTolerance] | AgoraError | None] = [None] * len(items)
        by_model: dict[str, list[tuple[int, ReplayJob]]] = {}
        for i, (receipt, request_bytes) in enumerate(items):
            try:
                receipt = verify_record(receipt.encode(), ReceiptBody)  # a forged signature is nobody's fraud
                body = receipt.body
                why = check_request_binding(body, request_bytes)
                if why and "CID" in why:
                    raise UnverifiableReceipt(
                        f"the request given for receipt {receipt.cid} is not the one it binds: {why}")
                if body.precision == UPSTREAM_PRECISION:
                    raise UnverifiableReceipt(
                        f"receipt {receipt.cid} was served by an upstream engine: upstream receipts carry no token "
                        "ids, so there is nothing to replay; they bind the exact text, sampling, token counts and "
                        "price only", hint="only receipts of engines that report token ids (the built-in one) can be "
                        "replayed")
                request = CanonicalRequest.decode(request_bytes)
                tol = self.tolerances(body.model, body.precision)
                self.admissible(receipt)
                with self._lock:
                    _, tok = self._model(body.model)
                if why:  # signed for other sampling than was asked: fraud, whatever the tokens
                    out[i] = (request_mismatch(why), tol)
                    continue
                prompt = prompt_ids(tok, request)
                if len(prompt) + len(body.prefix_tokens) + len(body.output_tokens) > self.context_length(body.model):
                    # the receipt understated its prompt: the replay is bounded by the context all the same
                    raise ReceiptTooLong(
                        f"receipt {receipt.cid}'s request and output exceed model {body.model}'s context")
                if why := prompt_binding(request, prompt):  # the provider signed for a prompt it did not render
                    out[i] = (ReplayResult(ok=False, checked_positions=0,
                                           failure=FailureEvidence(kind="prompt", position=-1, detail=why)), tol)
                    continue
                # Signature and binding are checked above, so the bare body is replayed.
                by_model.setdefault(body.model, []).append((i, ReplayJob(prompt, body, tol)))
            except AgoraError as exc:
                out[i] = exc
        for cid, jobs in by_model.items():
            with self._lock:
                model, tok = self._model(cid)
                results = check_receipts(model, [job for _, job in jobs], model_cid=cid, decode=tok.decode,
                                         eos_token=tok.eos_tokens)
            for (i, job), result in zip(jobs, results):
                out[i] = (result, job.tolerances)  # type: ignore[assignment]
        return out  # type: ignore[return-value]

    def judge(self, receipt: Record[ReceiptBody], request_bytes: bytes) -> Judgement:
        judgement = self.judge_many([(receipt, request_bytes)])[0]
        if isinstance(judgement, AgoraError):
            raise judgement
        return judgement

    def judge_many(self, items: list[tuple[Record[ReceiptBody], bytes]]) -> list[Judgement | AgoraError]:
        """Replay receipts together and sign a verdict (and a fraud proof when broken) for each."""
        return [r if isinstance(r, AgoraError) else self._judgement(receipt, request_bytes, *r)
                for (receipt, request_bytes), r in zip(items, self.replay_many(items))]

    def _judgement(self, receipt: Record[ReceiptBody], request_bytes: bytes, result: ReplayResult,
                   tol: ClassTolerance) -> Judgement:
        body = receipt.body
        proof = None
        if not result.ok:
            proof = sign_record(self.identity, FraudProofBody(
                receipt_cid=str(receipt.cid), receipt=receipt.encode().hex(), request=request_bytes.hex(),
                provider=receipt.signer, evidence=result.failure, tolerances=tol,
                reference_precision=REFERENCE_PRECISION, created_ms=now_ms(),
            ))
        verdict = sign_record(self.identity, VerdictBody(
            receipt=str(receipt.cid), provider=receipt.signer, model=body.model, precision=body.precision,
            ok=result.ok, checked_positions=result.checked_positions, failure=result.failure,
            fraud_proof=str(proof.cid) if proof else None, tolerances=tol, verified_ms=now_ms(),
        ))
        return Judgement(verdict, proof, result)

    def recheck(self, proof: Record[FraudProofBody]) -> Recheck:
        """Independently replay the receipt inside a fraud proof: does it really break the rule?"""
        proof = verify_record(proof.encode(), FraudProofBody)
        p = proof.body
        try:
            receipt = verify_record(bytes.fromhex(p.receipt), ReceiptBody)
            request_bytes = bytes.fromhex(p.request)
        except ValueError as exc:
            raise RecordError(f"fraud proof {proof.cid} embeds undecodable bytes: {exc}") from exc
        if str(receipt.cid) != p.receipt_cid or receipt.signer != p.provider:
            raise RecordError(f"fraud proof {proof.cid} names a receipt or provider other than the one it embeds")
        result, _ = self.replay(receipt, request_bytes)
        if result.ok:
            detail = f"all {result.checked_positions} positions are within tolerances; claimed " \
                     f"{p.evidence.kind} failure at position {p.evidence.position}"
        else:
            f = result.failure
            same = (f.kind, f.position) == (p.evidence.kind, p.evidence.position)
            detail = f"{f.kind} at position {f.position}: {f.detail}" + ("" if same else " (proof claimed "
                                                                         f"{p.evidence.kind} at {p.evidence.position})")
        return Recheck(holds=not result.ok, provider=p.provider, issuer=proof.signer, detail=detail, result=result)


def prompt_ids(tokenizer: Tokenizer, request: CanonicalRequest) -> list[int]:
    """The prompt token ids the provider's engine rendered for a canonical request."""
    if (request.messages if request.kind == "chat" else request.prompt) is None:
        raise UnverifiableReceipt(f"the canonical request is malformed: a {request.kind} request without "
                                  f"{'messages' if request.kind == 'chat' else 'a prompt'}")
    try:
        return render_prompt(tokenizer, GenerationRequest.from_canonical(request))
    except RequestError as exc:  # e.g. a chat request for a model without a chat template
        raise UnverifiableReceipt(f"cannot render the request's prompt: {exc}") from exc
