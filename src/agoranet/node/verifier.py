"""Verifier role: replays receipts, signs verdicts and fraud proofs, keeps per-provider reputation.

It audits a random fraction of the receipts it is sent (`POST /agora/v1/receipts`, e.g. by a
gateway) or pulls from providers/gateways (`GET {source}/agora/v1/receipts`), and every receipt a
user asks about (`POST /agora/v1/verify`). Fraud proofs from other verifiers are re-checked
(`POST /agora/v1/fraud-proofs`): a proof that holds excludes the provider, a false one marks its
issuer. `GET /agora/v1/reputation` gives gateways the scores to route by.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi import APIRouter
from pydantic import BaseModel

from agoranet.core.errors import AgoraError, RecordError, RequestError
from agoranet.core.identity import Identity
from agoranet.core.records import ReceiptBody, Record, decode_record, sign_record, verify_record
from agoranet.core.tasks import cancel_and_wait
from agoranet.engine.base import GenerationRequest
from agoranet.engine.models import model_cid, resolve_model
from agoranet.engine.tokenizer import ByteTokenizer
from agoranet.engine.transformers_engine import load_causal_lm, render_prompt
from agoranet.node.app import Cursor, PageSize
from agoranet.node.records_api import CBOR, records_router
from agoranet.node.state import NodeState
from agoranet.verify.records import ClassTolerance, FraudProofBody, TolerancesBody, VerdictBody
from agoranet.verify.replay import ReplayResult, check_receipt, check_request_binding, request_mismatch
from agoranet.verify.tolerances import (
    REFERENCE_PRECISION, NoTolerances, default_tolerances, load_tolerances, tolerance_for,
)
from agoranet.wire.canonical import CanonicalRequest

log = logging.getLogger(__name__)


class UnverifiableReceipt(AgoraError):
    hint = "the verifier needs the receipt's canonical request and the model it names (pass --model DIR)"


def now_ms() -> int:
    return int(time.time() * 1000)


# -- fetching records from nodes ------------------------------------------------------------------

def fetch_record(node: str, cid: str, client: httpx.Client | None = None) -> Record[Any]:
    """A signed record by CID from a node, checked (canonical bytes, known type, valid signature)."""
    raw = _fetch_bytes(node, cid, client)
    record = verify_record(raw)
    if str(record.cid) != cid:
        raise RecordError(f"{node} returned a record whose CID is {record.cid}, not {cid}")
    return record


def fetch_receipt(node: str, cid: str, client: httpx.Client | None = None) -> tuple[Record[ReceiptBody], bytes]:
    receipt = fetch_record(node, cid, client)
    if not isinstance(receipt.body, ReceiptBody):
        raise RecordError(f"{cid} is a {receipt.type} record, not a receipt")
    return receipt, _fetch_bytes(node, receipt.body.request, client)


def _fetch_bytes(node: str, cid: str, client: httpx.Client | None) -> bytes:
    url = f"{node.rstrip('/')}/agora/v1/records/{cid}"
    try:
        r = (client or httpx).get(url, headers={"accept": CBOR}, timeout=30)
    except httpx.HTTPError as exc:
        raise UnverifiableReceipt(f"cannot reach {node}: {exc}") from exc
    if r.status_code != 200:
        raise UnverifiableReceipt(f"{node} has no record {cid} (HTTP {r.status_code})")
    return r.content


def load_record_file(path: Path) -> Record[Any]:
    """A record saved as JSON: its `to_json` view, or a verdict file holding a `fraud_proof` key."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecordError(f"cannot read a record from {path}: {exc}") from exc
    return verify_record(doc.get("fraud_proof", doc))


# -- judging --------------------------------------------------------------------------------------

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
        self._loaded: dict[str, tuple[torch.nn.Module, ByteTokenizer]] = {}
        self._lock = threading.Lock()  # one replay at a time: the model is not re-entrant under torch threads
        if threads:
            torch.set_num_threads(threads)

    def _model(self, cid: str) -> tuple[torch.nn.Module, ByteTokenizer]:
        if cid not in self._loaded:
            if cid not in self._dirs:
                raise UnverifiableReceipt(f"this verifier does not hold model {cid}")
            self._loaded[cid] = (load_causal_lm(self._dirs[cid], REFERENCE_PRECISION),
                                 ByteTokenizer.from_dir(self._dirs[cid]))
        return self._loaded[cid]

    def tolerances(self, cid: str, precision: str) -> ClassTolerance:
        table = self._tables.get(cid)
        if table is None:
            raise NoTolerances(f"no tolerances for model {cid}")
        return tolerance_for(table, precision)

    def replay(self, receipt: Record[ReceiptBody], request_bytes: bytes) -> tuple[ReplayResult, ClassTolerance]:
        """Check signature and request binding (once each), then replay; raises when the receipt cannot be judged.

        Returns the judgement and the tolerances it was judged by."""
        receipt = verify_record(receipt.encode(), ReceiptBody)  # a forged signature is nobody's fraud
        body = receipt.body
        why = check_request_binding(body, request_bytes)
        if why and "CID" in why:
            raise UnverifiableReceipt(f"the request given for receipt {receipt.cid} is not the one it binds: {why}")
        request = CanonicalRequest.decode(request_bytes)
        tol = self.tolerances(body.model, body.precision)
        with self._lock:
            model, tok = self._model(body.model)
            if why:  # signed for other sampling than was asked: fraud, whatever the tokens
                return request_mismatch(why), tol
            prompt = prompt_ids(tok, request)
            # Signature and binding are checked above, so the bare body is replayed.
            return check_receipt(model, prompt, body, tol, model_cid=body.model, decode=tok.decode,
                                 eos_token=tok.eos), tol

    def judge(self, receipt: Record[ReceiptBody], request_bytes: bytes) -> Judgement:
        result, tol = self.replay(receipt, request_bytes)
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


def prompt_ids(tokenizer: ByteTokenizer, request: CanonicalRequest) -> list[int]:
    """The prompt token ids the provider's engine rendered for a canonical request."""
    if (request.messages if request.kind == "chat" else request.prompt) is None:
        raise UnverifiableReceipt(f"the canonical request is malformed: a {request.kind} request without "
                                  f"{'messages' if request.kind == 'chat' else 'a prompt'}")
    return render_prompt(tokenizer, GenerationRequest.from_canonical(request))


# -- reputation -----------------------------------------------------------------------------------

@dataclass
class ProviderScore:
    verified: int = 0
    passed: int = 0
    failed: int = 0
    fraud_proofs: list[str] = field(default_factory=list)

    @property
    def excluded(self) -> bool:
        return bool(self.fraud_proofs)

    @property
    def score(self) -> float:
        """Laplace-smoothed pass rate; 0 once a fraud is proven."""
        return 0.0 if self.excluded else (self.passed + 1) / (self.verified + 2)


@dataclass
class VerifierScore:
    proofs_checked: int = 0
    false_proofs: list[str] = field(default_factory=list)


class Reputation:
    def __init__(self) -> None:
        self.providers: dict[str, ProviderScore] = {}
        self.verifiers: dict[str, VerifierScore] = {}

    def add_verdict(self, verdict: VerdictBody) -> None:
        s = self.providers.setdefault(verdict.provider, ProviderScore())
        s.verified += 1
        if verdict.ok:
            s.passed += 1
        else:
            s.failed += 1
            if verdict.fraud_proof and verdict.fraud_proof not in s.fraud_proofs:
                s.fraud_proofs.append(verdict.fraud_proof)

    def add_recheck(self, proof_cid: str, recheck: Recheck) -> None:
        v = self.verifiers.setdefault(recheck.issuer, VerifierScore())
        v.proofs_checked += 1
        if recheck.holds:
            s = self.providers.setdefault(recheck.provider, ProviderScore())
            if proof_cid not in s.fraud_proofs:
                s.fraud_proofs.append(proof_cid)
        elif proof_cid not in v.false_proofs:
            v.false_proofs.append(proof_cid)

    def to_json(self) -> dict[str, Any]:
        return {
            "providers": {peer: {"score": round(s.score, 6), "verified": s.verified, "passed": s.passed,
                                 "failed": s.failed, "excluded": s.excluded, "fraud_proofs": s.fraud_proofs}
                          for peer, s in self.providers.items()},
            "verifiers": {peer: {"proofs_checked": v.proofs_checked, "false_proofs": v.false_proofs,
                                 "trusted": not v.false_proofs} for peer, v in self.verifiers.items()},
        }


# -- the role -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VerifierConfig:
    audit_fraction: float = 0.1  # share of seen receipts replayed; asked-for receipts are always replayed
    sources: tuple[str, ...] = ()  # provider/gateway URLs whose /agora/v1/receipts feed is pulled
    poll_interval_s: float = 5.0
    seed: int | None = None  # for the audit sampler (tests); None draws from the OS


class VerifyRequest(BaseModel):
    receipt: dict[str, Any] | None = None  # the receipt record (JSON view)
    receipt_cid: str | None = None  # … or its CID, fetched from `node`
    node: str | None = None  # where the receipt and its canonical request are stored
    request: str | None = None  # hex of the canonical request bytes, if not fetched from `node`


class ProofSubmission(BaseModel):
    record: dict[str, Any]


class VerifierRole:
    def __init__(self, identity: Identity, verifier: ReplayVerifier, state: NodeState, config: VerifierConfig) -> None:
        self.identity, self.verifier, self.state, self.config = identity, verifier, state, config
        # Receipts with top-20 logprobs of long answers, and fraud proofs carrying them, run to megabytes.
        self.body_limits = {path: 8 << 20 for path in ("/agora/v1/verify", "/agora/v1/receipts", "/agora/v1/fraud-proofs")}
        self.reputation = Reputation()
        self.audited = 0
        self.skipped = 0
        self._rng = random.Random(config.seed)
        self._queue: asyncio.Queue[tuple[Record[ReceiptBody], str | None, bytes | None]] | None = None
        self._seen: set[str] = set()
        self._cursors: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self._http: httpx.AsyncClient | None = None
        self.router = self._routes()

    async def start(self) -> None:
        for _, _, data in self.state.since("verdict", 0, 1 << 30):  # reputation survives restarts
            self.reputation.add_verdict(decode_record(data).body)
        self._queue = asyncio.Queue()
        self._http = httpx.AsyncClient(timeout=30)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="agora-verifier")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._http is not None:
            await self._http.aclose()

    async def _run(self) -> None:
        """Owned by start()/stop(): pull feeds and drain the audit queue until cancelled."""
        assert self._queue is not None
        next_poll = 0.0
        while True:
            if self.config.sources and time.monotonic() >= next_poll:
                for source in self.config.sources:
                    await self._pull(source)
                next_poll = time.monotonic() + self.config.poll_interval_s
            try:
                receipt, node, request = await asyncio.wait_for(self._queue.get(), timeout=0.2)
            except TimeoutError:
                continue
            try:
                await self.audit(receipt, node=node, request_bytes=request)
            except AgoraError as exc:
                log.warning("could not audit receipt %s: %s", receipt.cid, exc)

    async def _pull(self, source: str) -> None:
        assert self._http is not None
        try:
            r = await self._http.get(f"{source.rstrip('/')}/agora/v1/receipts",
                                     params={"after": self._cursors.get(source, 0), "limit": 200})
            r.raise_for_status()
            feed = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("cannot pull receipts from %s: %s", source, exc)
            return
        for item in feed.get("receipts", []):
            try:
                self.offer(verify_record(item["record"], ReceiptBody), node=source)
            except (AgoraError, KeyError) as exc:
                log.warning("skipping a bad receipt from %s: %s", source, exc)
        self._cursors[source] = int(feed.get("next", self._cursors.get(source, 0)))

    def offer(self, receipt: Record[ReceiptBody], *, node: str | None, request_bytes: bytes | None = None) -> bool:
        """A receipt seen on the network: queue it for audit with probability audit_fraction."""
        cid = str(receipt.cid)
        if cid in self._seen:
            return False
        self._seen.add(cid)
        if self._rng.random() >= self.config.audit_fraction:
            self.skipped += 1
            return False
        assert self._queue is not None
        self._queue.put_nowait((receipt, node, request_bytes))
        return True

    async def audit(self, receipt: Record[ReceiptBody], *, node: str | None = None,
                    request_bytes: bytes | None = None) -> Judgement:
        """Replay one receipt now; store and count the verdict (and fraud proof)."""
        if request_bytes is None:
            if node is None:
                raise UnverifiableReceipt(f"no canonical request for receipt {receipt.cid}: give `request` or `node`")
            assert self._http is not None
            r = await self._http.get(f"{node.rstrip('/')}/agora/v1/records/{receipt.body.request}",
                                     headers={"accept": CBOR})
            if r.status_code != 200:
                raise UnverifiableReceipt(f"{node} does not have request {receipt.body.request} (HTTP {r.status_code})")
            request_bytes = r.content
        judgement = await asyncio.to_thread(self.verifier.judge, receipt, request_bytes)
        # Not "receipt": that kind is the receipts this node signed, which a provider beside it feeds.
        self.state.put(receipt.encode(), "audited-receipt")
        self.state.put(request_bytes, "request")
        self.state.put(judgement.verdict.encode(), "verdict")
        if judgement.proof is not None:
            self.state.put(judgement.proof.encode(), "fraud-proof")
            log.warning("fraud proof %s: provider %s, receipt %s: %s", judgement.proof.cid, receipt.signer,
                        receipt.cid, judgement.result.failure.detail)
        self.reputation.add_verdict(judgement.verdict.body)
        self.audited += 1
        return judgement

    async def check_proof(self, proof: Record[FraudProofBody]) -> Recheck:
        recheck = await asyncio.to_thread(self.verifier.recheck, proof)
        self.state.put(proof.encode(), "fraud-proof" if recheck.holds else "false-fraud-proof")
        self.reputation.add_recheck(str(proof.cid), recheck)
        return recheck

    # -- routes -------------------------------------------------------------------------------------

    def _routes(self) -> APIRouter:
        r = APIRouter()

        @r.post("/agora/v1/verify")
        async def verify(req: VerifyRequest) -> dict[str, Any]:
            """Replay one receipt now (a user asking), whatever the audit fraction."""
            if req.receipt is not None:
                receipt = verify_record(req.receipt, ReceiptBody)
            elif req.receipt_cid and req.node:
                receipt = await self._fetch_receipt(req.node, req.receipt_cid)
            else:
                raise RequestError("give `receipt`, or `receipt_cid` with `node`", param="receipt")
            request = _hex(req.request) if req.request else None
            j = await self.audit(receipt, node=req.node, request_bytes=request)
            return _judgement_json(j)

        @r.post("/agora/v1/receipts", status_code=202)
        async def submit(req: VerifyRequest) -> dict[str, Any]:
            """A receipt seen by a gateway or user; audited with probability audit_fraction."""
            if req.receipt is None:
                raise RequestError("give the `receipt` record", param="receipt")
            receipt = verify_record(req.receipt, ReceiptBody)
            queued = self.offer(receipt, node=req.node, request_bytes=_hex(req.request) if req.request else None)
            return {"receipt_cid": str(receipt.cid), "queued": queued}

        @r.post("/agora/v1/fraud-proofs")
        async def submit_proof(sub: ProofSubmission) -> dict[str, Any]:
            proof = verify_record(sub.record, FraudProofBody)
            rc = await self.check_proof(proof)
            return {"fraud_proof_cid": str(proof.cid), "holds": rc.holds, "provider": rc.provider,
                    "issuer": rc.issuer, "detail": rc.detail}

        @r.get("/agora/v1/fraud-proofs")
        async def proofs(after: Cursor = 0, limit: PageSize = 100) -> dict[str, Any]:
            return self.state.feed("fraud-proof", after, limit, "fraud_proofs")

        @r.get("/agora/v1/verdicts")
        async def verdicts(after: Cursor = 0, limit: PageSize = 100) -> dict[str, Any]:
            return self.state.feed("verdict", after, limit, "verdicts")

        @r.get("/agora/v1/reputation")
        async def reputation() -> dict[str, Any]:
            return {"verifier": str(self.identity.peer_id), "audit_fraction": self.config.audit_fraction,
                    "audited": self.audited, **self.reputation.to_json()}

        r.include_router(records_router(self.state))  # the receipts audited, verdicts and fraud proofs
        return r

    async def _fetch_receipt(self, node: str, cid: str) -> Record[ReceiptBody]:
        assert self._http is not None
        try:
            r = await self._http.get(f"{node.rstrip('/')}/agora/v1/records/{cid}", headers={"accept": CBOR})
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # a user's `node` may be anything
            raise UnverifiableReceipt(f"cannot fetch receipt {cid} from {node!r}: {exc}") from exc
        if r.status_code != 200:
            raise UnverifiableReceipt(f"{node} has no receipt {cid} (HTTP {r.status_code})")
        receipt = verify_record(r.content, ReceiptBody)
        if str(receipt.cid) != cid:
            raise RecordError(f"{node} returned a receipt whose CID is {receipt.cid}, not {cid}")
        return receipt


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise RequestError("`request` must be the hex of the canonical request bytes", param="request") from exc


def _judgement_json(j: Judgement) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": j.verdict.body.ok, "verdict_cid": str(j.verdict.cid), "verdict": j.verdict.to_json()}
    if j.proof is not None:
        out |= {"fraud_proof_cid": str(j.proof.cid), "fraud_proof": j.proof.to_json()}
    return out

