"""The replay judge: reference models by CID and tolerance tables; signs verdicts and fraud proofs.

It judges one receipt (with its canonical request) by teacher-forced replay, and re-checks the
receipt inside another verifier's fraud proof. The verifier role and `agora verify` both use it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from agoranet.core.errors import AgoraError, ModelError, ModelUnavailable, RecordError, RequestError
from agoranet.core.identity import Identity
from agoranet.core.records import ReceiptBody, Record, sign_record, verify_record
from agoranet.engine.base import GenerationRequest
from agoranet.engine.models import model_cid, resolve_model
from agoranet.engine.tokenizer import Tokenizer, load_tokenizer
from agoranet.engine.base import render_prompt
from agoranet.engine.transformers_engine import load_causal_lm
from agoranet.engine.upstream import UPSTREAM_PRECISION
from agoranet.verify.records import (
    ClassTolerance, FailureEvidence, FraudProofBody, VerdictBody, WindowProofBody, WindowTest,
)
from agoranet.verify.replay import (
    ReplayJob, ReplayResult, check_receipts, check_request_binding, prompt_binding, request_mismatch,
)
from agoranet.verify.rules import RETIRED, RULES
from agoranet.verify.tolerances import (
    REFERENCE_PRECISION, AnyTolerances, NoTolerances, default_tolerances, limits_for, load_tolerances,
    outside_calibration,
    tolerance_for,
)
from agoranet.verify.window import bucket_index, flip_score, window_test
from agoranet.wire.canonical import CanonicalRequest


class UnverifiableReceipt(AgoraError):
    hint = "the verifier needs the receipt's canonical request and the model it names (pass --model DIR)"


class Violation(AgoraError):
    """A receipt that cannot be judged for a reason its provider controls: an undeclared or uncalibrated
    precision class, a model it does not offer or nobody can fetch, a malformed request or binding.

    Verifiers sign it as a failed verdict (no replay needed), so declaring something unjudgeable is no
    escape from audit; reasons a verifier controls (busy, its own store broken) stay UnverifiableReceipt."""

    hint = ("a provider may sell only the models and precision classes its signed offer names and that "
            "verifiers hold tolerance records for")

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind  # precision | model | offer | rule | request | length | range


ModelFetcher = Callable[[str], Path]  # a model CID -> its directory; raises ModelUnavailable when nobody serves it


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Judgement:
    verdict: Record[VerdictBody]
    proof: Record[FraudProofBody] | None
    result: ReplayResult
    # the receipt's term of its provider's window sum (verify.window), when it passed and its class has a window test
    window_score: float | None = None


@dataclass
class Recheck:
    holds: bool  # True: the receipt really breaks the rule
    provider: str
    issuer: str  # the verifier that signed the proof
    detail: str
    result: ReplayResult | None  # the replay of the proof's receipt (None for a window proof: several receipts)


class ReplayVerifier:
    """Reference models by CID (loaded at fp32 on first use), tolerance tables, and the judging logic."""

    def __init__(self, identity: Identity, *, models: list[str] | None = None, tolerance_files: list[Path] = (),
                 threads: int | None = 1, fetch: ModelFetcher | None = None) -> None:
        self.identity = identity
        self._fetch = fetch  # where a model this verifier lacks is fetched by CID (storage peers)
        self._dirs: dict[str, Path] = {}
        for spec in models or ["agora-tiny"]:
            model_dir, _ = resolve_model(spec)
            self._dirs[model_cid(model_dir)] = model_dir
        self._tables: dict[str, AnyTolerances] = {}
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

    def classes(self) -> dict[str, list[str]]:
        """The precision classes this verifier holds tolerances for, by model CID: what may be sold."""
        return {cid: sorted(c.precision for c in table.classes) for cid, table in self._tables.items()}

    def holds(self, body: ReceiptBody) -> bool:
        """Whether this verifier holds a tolerance record for the receipt's (model, precision): the classes it
        judges (upstream receipts are a class of their own, refused later)."""
        table = self._tables.get(body.model)
        return body.precision == UPSTREAM_PRECISION or (
            table is not None and any(c.precision == body.precision for c in table.classes))

    def chose(self, receipt: Record[ReceiptBody], offered: set[tuple[str, str]] | None = None) -> None:
        """Raise Violation for what the provider chose and no verifier may judge, whatever classes this verifier
        holds: a (model, precision) its known offers do not name, or a sampling rule not judged here (a rule
        this verifier does not know is never judged as another: that would be a false fraud proof)."""
        body = receipt.body
        if offered is not None and (body.model, body.precision) not in offered:
            raise Violation(f"receipt {receipt.cid} declares model {body.model} at precision {body.precision!r}, "
                            "which no signed offer of its provider names", kind="offer")
        if body.precision != UPSTREAM_PRECISION and body.rule not in RULES:
            why = RETIRED.get(body.rule, "no verifier here knows it")
            raise Violation(f"receipt {receipt.cid} names sampling rule {body.rule[:80]!r}, which is not judged "
                            f"(judged: {', '.join(sorted(RULES))}): {why}", kind="rule")

    def declared(self, receipt: Record[ReceiptBody], offered: set[tuple[str, str]] | None = None) -> None:
        """Raise Violation when the receipt declares what its provider may not sell (`chose`), or a (model,
        precision) this verifier holds no tolerance record for. Cheap: no model is loaded, so every receipt
        seen can be checked, not just the audited share. The verifier role judges only classes it holds
        (`holds`), so there the second kind is never signed: another verifier may hold that class."""
        body = receipt.body
        self.chose(receipt, offered)
        if body.precision == UPSTREAM_PRECISION:
            return  # a declared class of its own: never replayed (see replay_many), not a violation
        table = self._tables.get(body.model)
        if table is None:
            raise Violation(f"receipt {receipt.cid} names model {body.model}, for which no tolerance record "
                            "exists here: nobody can judge its answers", kind="model")
        try:
            tolerance_for(table, body.precision)
        except NoTolerances:
            raise Violation(f"receipt {receipt.cid} declares precision {body.precision!r}, which is not "
                            f"calibrated for model {body.model} (calibrated: "
                            f"{', '.join(c.precision for c in table.classes)})", kind="precision") from None

    def _dir(self, cid: str) -> Path:
        """The model's local files, fetched by CID when this verifier lacks them: a model nobody serves
        is its provider's violation; a fetch that fails here for other reasons is this verifier's problem."""
        if cid not in self._dirs:
            if self._fetch is None:
                raise Violation(f"model {cid} is not held by this verifier and it has no storage peers to fetch "
                                "it from", kind="model")
            try:
                path = self._fetch(cid)
            except ModelUnavailable as exc:
                raise Violation(f"model {cid} cannot be fetched by its CID: {exc}", kind="model") from None
            except (ModelError, OSError) as exc:
                raise UnverifiableReceipt(f"cannot fetch model {cid} into this verifier's store: {exc}") from exc
            self._dirs[cid] = path
        return self._dirs[cid]

    def context_length(self, cid: str) -> int:
        """The model's context in tokens, from its config (no load): no honest receipt is longer."""
        path = self._dir(cid)
        if path.is_file():  # a GGUF: llama.cpp reads its context from the file
            with self._lock:
                return int(self._model(cid)[0].context_length)
        try:
            config = json.loads((path / "config.json").read_text())
            return int(config.get("max_position_embeddings", 2048))
        except (OSError, ValueError, TypeError) as exc:
            raise UnverifiableReceipt(f"cannot read the context length of model {cid}: {exc}") from exc

    def admissible(self, receipt: Record[ReceiptBody]) -> None:
        """Before anything is queued, bound the replay: a receipt declaring what may not be sold, more tokens
        than the model's context (no honest receipt has that many), or lying outside the range its class's
        tolerances were calibrated over (which providers refuse up front) is a Violation (judged without
        replay); a model this verifier cannot read is UnverifiableReceipt: refused, not judged."""
        body = receipt.body
        self.declared(receipt)
        if body.precision == UPSTREAM_PRECISION:
            raise UnverifiableReceipt(f"receipt {receipt.cid} was served by an upstream engine, which reports no "
                                      "token ids: there is nothing to replay")
        if body.model not in self._dirs and self._fetch is not None:
            self.calibrated(receipt)
            return  # fetched when it is replayed (not here, on a request's path), and bounded there
        context = self.context_length(body.model)
        length = body.prompt_tokens + len(body.prefix_tokens) + len(body.output_tokens)
        if length > context:
            raise Violation(f"receipt {receipt.cid} covers {length} tokens; model {body.model} has a context "
                            f"of {context}: no honest receipt is that long", kind="length")
        self.calibrated(receipt)  # after the context: longer than any honest receipt stays a Violation

    def calibrated(self, receipt: Record[ReceiptBody]) -> None:
        """Raise Violation when the receipt lies outside the prompt/output range its class's tolerances were
        calibrated over: no honest drift was measured there, so it is never replayed (no fraud proof), and
        since a provider refuses requests beyond its record's range up front, only one that ignored it signs
        such a receipt. (The verifier role first refuses one whose provider's signed offer states a wider range,
        this verifier's record being the narrower, or is not known to it: `VerifierRole._not_here`.) Cheap."""
        body = receipt.body
        if (why := self.outside(body)) is not None:
            raise Violation(f"receipt {receipt.cid} is outside the range its tolerances were calibrated over, which "
                            f"its provider must refuse up front: {why}", kind="range")

    def outside(self, body: ReceiptBody) -> str | None:
        """Why the receipt lies outside the range this verifier's record for its class covers, or None."""
        table = self._tables.get(body.model)
        tol = next((c for c in table.classes if c.precision == body.precision), None) if table else None
        return outside_calibration(tol, body) if tol is not None else None

    def _model(self, cid: str) -> tuple[torch.nn.Module, Tokenizer]:
        if cid not in self._loaded:
            path = self._dir(cid)
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

    def violation(self, receipt: Record[ReceiptBody], why: Violation) -> Judgement:
        """The signed failed verdict on a receipt that may not be judged for a reason its provider controls."""
        body = receipt.body
        failure = FailureEvidence(kind="violation", position=-1, detail=f"{why.kind}: {why.args[0]}")
        verdict = sign_record(self.identity, VerdictBody(
            receipt=str(receipt.cid), provider=receipt.signer, model=body.model, precision=body.precision, ok=False,
            checked_positions=0, failure=failure, verified_ms=now_ms()))
        return Judgement(verdict, None, ReplayResult(ok=False, checked_positions=0, failure=failure))

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
                self.declared(receipt)  # what may not be sold is a Violation, whatever request came with it
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
                self.admissible(receipt)  # Violation: declared what may not be sold, or longer than the context
                request = CanonicalRequest.decode(request_bytes)
                tol = self.tolerances(body.model, body.precision)
                with self._lock:
                    _, tok = self._model(body.model)
                if why:  # signed for other sampling than was asked: fraud, whatever the tokens
                    out[i] = (request_mismatch(why), limits_for(tol, body.prompt_tokens + len(body.prefix_tokens),
                                                                len(body.output_tokens)))
                    continue
                prompt = prompt_ids(tok, request)
                if len(prompt) + len(body.prefix_tokens) + len(body.output_tokens) > self.context_length(body.model):
                    # the receipt understated its prompt: the replay is bounded by the context all the same
                    raise Violation(f"receipt {receipt.cid}'s request and output exceed model {body.model}'s "
                                    "context", kind="length")
                if why := prompt_binding(request, prompt):  # the provider signed for a prompt it did not render
                    out[i] = (ReplayResult(ok=False, checked_positions=0,
                                           failure=FailureEvidence(kind="prompt", position=-1, detail=why)),
                              limits_for(tol, len(prompt) + len(body.prefix_tokens), len(body.output_tokens)))
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
                # the limits of the receipt's prompt-length bucket at its output length (replay picked them from
                # the prompt it rendered); a receipt stopped before replay states those the same way
                applied = result.tolerances if isinstance(result.tolerances, ClassTolerance) else limits_for(
                    job.tolerances, len(job.prompt_ids) + len(job.receipt.prefix_tokens),  # type: ignore[arg-type,union-attr]
                    len(job.receipt.output_tokens))  # type: ignore[union-attr]
                out[i] = (result, applied)
        return out  # type: ignore[return-value]

    def judge(self, receipt: Record[ReceiptBody], request_bytes: bytes) -> Judgement:
        judgement = self.judge_many([(receipt, request_bytes)])[0]
        if isinstance(judgement, AgoraError):
            raise judgement
        return judgement

    def judge_many(self, items: list[tuple[Record[ReceiptBody], bytes]]) -> list[Judgement | AgoraError]:
        """Replay receipts together and sign a verdict (and a fraud proof when broken) for each; a Violation
        is signed as a failed verdict too, an error this verifier is to blame for is returned unjudged."""
        return [self.violation(receipt, r) if isinstance(r, Violation) else r if isinstance(r, AgoraError)
                else self._judgement(receipt, request_bytes, *r)
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
        test = self.window_test(body.model, body.precision)
        score = self._window_score(body, result, tol, test) if result.ok and test is not None else None
        return Judgement(verdict, proof, result, score)

    # -- the per-provider window test (verify.window) -------------------------------------------------

    def window_test(self, cid: str, precision: str) -> WindowTest | None:
        """The window test of this verifier's record for (model, class), or None (no record, or none in it)."""
        try:
            return window_test(self.tolerances(cid, precision))
        except NoTolerances:
            return None

    def _window_score(self, body: ReceiptBody, result: ReplayResult, applied: ClassTolerance, test: WindowTest) -> float:
        # `applied` holds the receipt's bucket (its max_prompt_tokens), picked from the prompt the replay rendered
        bucket = bucket_index(self.tolerances(body.model, body.precision), applied.max_prompt_tokens)
        return flip_score(test, bucket, len(body.output_tokens), result.flip_margins)

    def window_proof(self, entries: list[tuple[Record[ReceiptBody], bytes, float]]) -> Record[WindowProofBody]:
        """Sign a failed window: its receipts (each with its request and score), all of one provider and class."""
        first = entries[0][0]
        test = self.window_test(first.body.model, first.body.precision)
        assert test is not None, "a window proof needs the class's window test"
        scores = [score for _, _, score in entries]
        return sign_record(self.identity, WindowProofBody(
            provider=first.signer, model=first.body.model, precision=first.body.precision,
            receipt_cids=[str(r.cid) for r, _, _ in entries], receipts=[r.encode().hex() for r, _, _ in entries],
            requests=[req.hex() for _, req, _ in entries], scores=scores, total=sum(scores), window=test,
            reference_precision=REFERENCE_PRECISION, created_ms=now_ms()))

    def recheck_window(self, proof: Record[WindowProofBody]) -> Recheck:
        """Independently replay every receipt of a window proof with this verifier's record: do their flip
        excesses really sum above the class's window limit? Raises when it cannot be re-checked here (another
        window test than this verifier's record holds, or a malformed proof)."""
        proof = verify_record(proof.encode(), WindowProofBody)
        p = proof.body
        n = len(p.receipt_cids)
        if not n == len(p.receipts) == len(p.requests) == len(p.scores) == p.window.size or len(set(p.receipt_cids)) < n:
            raise RecordError(f"window proof {proof.cid} must embed {p.window.size} distinct receipts, each with its "
                              "request and score")
        test = self.window_test(p.model, p.precision)
        if test != p.window:
            raise UnverifiableReceipt(
                f"window proof {proof.cid} was judged by a window test this verifier's record for model {p.model} at "
                f"precision {p.precision!r} does not hold: it cannot be re-checked here",
                hint="re-check it with the tolerance record it was judged by (pass --tolerances FILE)")
        items = []
        for cid, receipt_hex, request_hex in zip(p.receipt_cids, p.receipts, p.requests):
            try:
                receipt = verify_record(bytes.fromhex(receipt_hex), ReceiptBody)
                request_bytes = bytes.fromhex(request_hex)
            except ValueError as exc:
                raise RecordError(f"window proof {proof.cid} embeds undecodable bytes: {exc}") from exc
            b = receipt.body
            if str(receipt.cid) != cid or receipt.signer != p.provider or (b.model, b.precision) != (p.model, p.precision):
                raise RecordError(f"window proof {proof.cid} embeds receipt {receipt.cid}, which is not the receipt it "
                                  "names or not its provider's receipt of that model and class")
            items.append((receipt, request_bytes))
        scores = []
        for (receipt, _), judged in zip(items, self.replay_many(items)):
            if isinstance(judged, AgoraError):
                raise judged
            result, applied = judged
            scores.append(self._window_score(receipt.body, result, applied, test))
        total = sum(scores)
        holds = total > test.limit
        detail = (f"{n} receipts' flip excesses sum to {total:.4g} ({'above' if holds else 'within'} the window limit "
                  f"{test.limit:.4g}, false alarms {test.far:g} per honest window); the proof claimed {p.total:.4g}")
        return Recheck(holds=holds, provider=p.provider, issuer=proof.signer, detail=detail, result=None)

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
        raise Violation(f"the canonical request is malformed: a {request.kind} request without "
                        f"{'messages' if request.kind == 'chat' else 'a prompt'}", kind="request")
    try:
        return render_prompt(tokenizer, GenerationRequest.from_canonical(request))
    except RequestError as exc:  # e.g. a chat request for a model without a chat template
        raise Violation(f"cannot render the request's prompt: {exc}", kind="request") from exc
