"""Verifier role: replays receipts (with node.judge), signs verdicts and fraud proofs, keeps reputation.

It audits a random fraction of the receipts it is sent (`POST /agora/v1/receipts`, e.g. by a
gateway) or pulls from providers/gateways (`GET {source}/agora/v1/receipts`), and every receipt a
user asks about (`POST /agora/v1/verify`). Fraud proofs from other verifiers are re-checked
(`POST /agora/v1/fraud-proofs`): a proof that holds excludes the provider, a false one marks its
issuer. `GET /agora/v1/reputation` gives gateways the scores to route by.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import APIRouter
from pydantic import BaseModel

from agoranet.core.errors import AgoraError, RecordError, RequestError
from agoranet.core.identity import Identity
from agoranet.core.records import ReceiptBody, Record, decode_record, verify_record
from agoranet.core.tasks import cancel_and_wait
from agoranet.node.app import Cursor, PageSize
from agoranet.node.judge import Judgement, Recheck, ReplayVerifier, UnverifiableReceipt
from agoranet.node.records_api import CBOR, records_router
from agoranet.node.reputation import Reputation
from agoranet.node.state import NodeState
from agoranet.verify.records import FraudProofBody

log = logging.getLogger(__name__)


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

