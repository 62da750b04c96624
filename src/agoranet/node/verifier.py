"""Verifier role: replays receipts (with node.judge), signs verdicts and fraud proofs, keeps reputation.

It audits a random fraction of the receipts it is sent (`POST /agora/v1/receipts`, e.g. by a
gateway) or pulls from providers/gateways (`GET {source}/agora/v1/receipts`), and every receipt a
user asks about (`POST /agora/v1/verify`). Fraud proofs from other verifiers are re-checked
(`POST /agora/v1/fraud-proofs`): a proof that holds excludes the provider, a false one marks its
issuer. `GET /agora/v1/reputation` gives gateways the scores to route by.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import APIRouter

from agoranet.core.errors import AgoraError, RecordError, RequestError
from agoranet.core.identity import Identity
from agoranet.core.records import OfferBody, ReceiptBody, Record, decode_record, verify_record
from agoranet.core.tasks import cancel_and_wait
from agoranet.net.agora_client import NOT_JSON, UNEXPECTED, AgoraClient, NodeError, NodeRefused, NodeUnreachable
from agoranet.node.app import Cursor, PageSize
from agoranet.node.judge import Judgement, Recheck, ReplayVerifier, UnverifiableReceipt, Violation, now_ms
from agoranet.node.records_api import records_router
from agoranet.node.reputation import Reputation
from agoranet.node.state import NodeState
from agoranet.verify.records import FraudProofBody, WindowProofBody
from agoranet.wire.agora import ProofSubmission, VerifyRequest

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 8 << 20  # a fetched receipt or request larger than this is refused unread
AUDIT_BATCH = 32  # queued receipts replayed together by the audit loop
Audit = tuple[Record[ReceiptBody], str | None, bytes | None]  # a receipt, the node storing it, its request bytes


@dataclass(frozen=True)
class VerifierConfig:
    audit_fraction: float = 0.1  # share of seen receipts replayed; asked-for receipts are always replayed
    sources: tuple[str, ...] = ()  # provider/gateway URLs whose /agora/v1/receipts feed is pulled
    poll_interval_s: float = 5.0
    seed: int | None = None  # for the audit sampler (tests); None draws from the OS


class VerifierRole:
    def __init__(self, identity: Identity, verifier: ReplayVerifier, state: NodeState, config: VerifierConfig) -> None:
        self.identity, self.verifier, self.state, self.config = identity, verifier, state, config
        # Receipts with top-20 logprobs of long answers, and fraud proofs carrying them, run to megabytes.
        self.body_limits = {path: 8 << 20 for path in ("/agora/v1/verify", "/agora/v1/receipts", "/agora/v1/fraud-proofs")}
        # a window proof embeds a whole window of them (32 receipts of 256 tokens with top-20 logprobs: ~6 MB of hex)
        self.body_limits["/agora/v1/window-proofs"] = 32 << 20
        self.reputation = Reputation()
        self.audited = 0
        self.skipped = 0
        self.audit_errors = 0  # audits that failed for any reason (the loop logs them and goes on)
        self.audit_batches = 0  # replays of one or more receipts together (audit_many calls with any to replay)
        self.refused = 0  # receipts refused at submission (a model this verifier cannot read, unvouched node)
        self.violations = 0  # receipts judged violations: unjudgeable for a reason their provider controls
        self.window_proofs = 0  # failed per-provider windows signed here (verify.window)
        # feed receipts not judged here: a class it holds no tolerance record for (another may), or beyond its
        # record's range without an offer showing that their provider ignored its own (see _not_here)
        self.not_judged = 0
        self._offers: dict[str, str] = {}  # provider peer id -> the URL its latest signed offer names
        # provider peer id -> every (model CID, precision) its signed offers seen here named
        self._offered: dict[str, set[tuple[str, str]]] = {}
        # (provider, model CID, precision) -> the (prompt, output) range its latest signed offer states
        self._ranges: dict[tuple[str, str, str], tuple[int, int]] = {}
        self._rng = random.Random(config.seed)
        self._queue: asyncio.Queue[Audit] | None = None
        self._seen: set[str] = set()
        # receipts queued from the operator's sources (feeds read in order, sampled by this verifier's own draw):
        # the only ones whose scores enter a provider's window (see _keep)
        self._from_sources: set[str] = set()
        self._cursors: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self._http: httpx.AsyncClient | None = None
        self.router = self._routes()

    async def start(self) -> None:
        for _, _, data in self.state.since("verdict", 0, 1 << 30):  # reputation survives restarts
            self.reputation.add_verdict(decode_record(data).body)
        for _, cid, data in self.state.since("window-proof", 0, 1 << 30):
            self.reputation.add_window_proof(decode_record(data).body.provider, cid)
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
                    try:
                        await self._pull(source)
                    except Exception:
                        self.audit_errors += 1
                        log.exception("pulling receipts from %s failed", source)
                next_poll = time.monotonic() + self.config.poll_interval_s
            try:
                batch = [await asyncio.wait_for(self._queue.get(), timeout=0.2)]
            except TimeoutError:
                continue
            while len(batch) < AUDIT_BATCH and not self._queue.empty():  # what queued meanwhile, replayed together
                batch.append(self._queue.get_nowait())
            try:
                judged = await self.audit_many(batch)
            except Exception:  # one bad receipt or node must never stop auditing
                self.audit_errors += len(batch)
                log.exception("auditing receipts %s failed", ", ".join(str(r.cid) for r, _, _ in batch))
                continue
            for (receipt, _, _), j in zip(batch, judged):
                if isinstance(j, AgoraError):
                    self.audit_errors += 1
                    log.warning("could not audit receipt %s: %s", receipt.cid, j)

    async def _pull(self, source: str) -> None:
        try:
            feed = await self._node(source).receipts(after=self._cursors.get(source, 0), limit=200)
        except NodeError as exc:
            log.warning("cannot pull receipts from %s: %s", source, exc)
            return
        if feed.items:
            await self._learn_range(source)
        for item in feed.items:
            try:
                receipt = verify_record(item.record, ReceiptBody)
                if (why := self._not_here(receipt)) is not None:
                    self.not_judged += 1
                    log.info("not judging receipt %s from %s: %s", receipt.cid, source, why)
                    continue
                with contextlib.suppress(Violation):  # judged, without replay, once queued
                    self.verifier.admissible(receipt)
                if self.offer(receipt, node=source):
                    self._from_sources.add(str(receipt.cid))
            except AgoraError as exc:
                log.warning("skipping a bad receipt from %s: %s", source, exc)
        self._cursors[source] = feed.next

    async def _learn_range(self, source: str) -> None:
        """The calibrated range a source's own offer states (a provider's; a gateway serves none): only the
        range is taken from it, never what it sells, so its older receipts of another class stay unjudged
        rather than becoming offer violations."""
        try:
            record = verify_record((await self._node(source).offer(max_bytes=MAX_RECORD_BYTES)).record, OfferBody)
        except (NodeError, RecordError):
            return
        if record.body.url.rstrip("/") == source.rstrip("/") and record.body.expires_ms > now_ms():
            self._remember_ranges(record)

    def _remember_ranges(self, offer: Record[OfferBody]) -> None:
        for m in offer.body.models:
            self._ranges[(offer.signer, m.cid, offer.body.precision)] = (m.max_prompt_tokens, m.max_output_tokens)

    def _not_here(self, receipt: Record[ReceiptBody]) -> str | None:
        """Why this verifier does not judge a receipt, for reasons that are not shown to be its provider's: a class
        it holds no tolerance record for (another verifier may), or one outside its record's range unless the
        provider's signed offer (handed by a gateway, or served by its feed or the node named) states a range that
        does not cover it either — the provider then ignored its own range (a violation); when the offer is
        unknown, or covers it (this verifier's record is the narrower), it is refused, not judged, so no stranger
        can turn an honest provider's long answers into violations at a verifier with a narrower record. A
        violation its provider chose (an undeclared class, an unknown rule) is judged whatever this one holds."""
        if self._violation(receipt, chose_only=True) is not None:
            return None
        body = receipt.body
        if not self.verifier.holds(body):
            return (f"this verifier holds no tolerance record for model {body.model} at precision "
                    f"{body.precision!r}: another verifier may judge it")
        if (why := self.verifier.outside(body)) is None:
            return None
        stated = self._ranges.get((receipt.signer, body.model, body.precision))
        if stated is None:
            return (f"{why}; no signed offer of its provider is known here, so whether it ignored its own range "
                    "cannot be told (submit it with the provider's offer or node)")
        if all(stated) and body.prompt_tokens + len(body.prefix_tokens) <= stated[0] and \
                len(body.output_tokens) <= stated[1]:
            return (f"{why}; its provider's signed offer states a range of {stated[0]} prompt and {stated[1]} "
                    "output tokens: this verifier's record is the narrower one")
        return None

    def offer(self, receipt: Record[ReceiptBody], *, node: str | None, request_bytes: bytes | None = None) -> bool:
        """A receipt seen on the network: queue it for audit with probability audit_fraction, and always when
        it declares what its provider may not sell (judging that costs no replay, so none escapes)."""
        cid = str(receipt.cid)
        if cid in self._seen:
            return False
        self._seen.add(cid)
        if self._violation(receipt) is None and self._rng.random() >= self.config.audit_fraction:
            self.skipped += 1
            return False
        assert self._queue is not None
        self._queue.put_nowait((receipt, node, request_bytes))
        return True

    def _violation(self, receipt: Record[ReceiptBody], *, chose_only: bool = False) -> Violation | None:
        check = self.verifier.chose if chose_only else self.verifier.declared
        try:
            check(receipt, self._offered.get(receipt.signer))
        except Violation as why:
            return why
        return None

    async def audit(self, receipt: Record[ReceiptBody], *, node: str | None = None,
                    request_bytes: bytes | None = None) -> Judgement:
        """Replay one receipt now; store and count the verdict (and fraud proof). A receipt that declares what
        its provider may not sell is judged a violation without its request or a replay."""
        judged = (await self.audit_many([(receipt, node, request_bytes)]))[0]
        if isinstance(judged, AgoraError):
            raise judged
        return judged

    async def audit_many(self, items: list[Audit]) -> list[Judgement | AgoraError]:
        """Replay receipts together (those of one model in shared forward passes, `ReplayVerifier.judge_many`),
        fetching the canonical requests not given from their nodes first; store and count each verdict.
        Receipts that declare what their provider may not sell are judged violations first, without replay."""
        out: dict[int, Judgement | AgoraError] = {}
        todo: list[int] = []
        for i, (receipt, _, _) in enumerate(items):
            if (why := self._violation(receipt)) is not None:
                out[i] = self._keep(receipt, None, self.verifier.violation(receipt, why))
            else:
                todo.append(i)
        requests = await asyncio.gather(*(self._request_of(*items[i]) for i in todo))
        ready = [(items[i][0], req) for i, req in zip(todo, requests) if isinstance(req, bytes)]
        self.audit_batches += bool(ready)
        judged = iter(await asyncio.to_thread(self.verifier.judge_many, ready))
        for i, req in zip(todo, requests):
            if not isinstance(req, bytes):
                out[i] = req
            elif isinstance(j := next(judged), AgoraError):
                out[i] = j
            else:
                out[i] = self._keep(items[i][0], req, j)
        return [out[i] for i in range(len(items))]

    async def _request_of(self, receipt: Record[ReceiptBody], node: str | None,
                          request_bytes: bytes | None) -> bytes | AgoraError:
        if request_bytes is not None:
            return request_bytes
        if node is None:
            return UnverifiableReceipt(f"no canonical request for receipt {receipt.cid}: give `request` or `node`")
        try:
            return await self._get_record(node, receipt.body.request)
        except AgoraError as exc:
            return exc

    def _keep(self, receipt: Record[ReceiptBody], request_bytes: bytes | None, judgement: Judgement) -> Judgement:
        # Not "receipt": that kind is the receipts this node signed, which a provider beside it feeds.
        self.state.put(receipt.encode(), "audited-receipt")
        if request_bytes is not None:
            self.state.put(request_bytes, "request")
        self.state.put(judgement.verdict.encode(), "verdict")
        if (f := judgement.verdict.body.failure) is not None and f.kind == "violation":
            self.violations += 1
            log.warning("violation: provider %s, receipt %s: %s", receipt.signer, receipt.cid, f.detail)
        if judgement.proof is not None:
            self.state.put(judgement.proof.encode(), "fraud-proof")
            log.warning("fraud proof %s: provider %s, receipt %s: %s", judgement.proof.cid, receipt.signer,
                        receipt.cid, judgement.result.failure.detail)
        first = str(receipt.cid) not in self.reputation.judged
        self.reputation.add_verdict(judgement.verdict.body)
        self.audited += 1
        # Only receipts pulled from the operator's sources enter windows, each once: a stranger submitting receipts
        # (or one again and again) could otherwise fill an honest provider's window with its worst ones.
        if first and judgement.window_score is not None and str(receipt.cid) in self._from_sources:
            self._window(receipt, judgement.window_score)
        self._from_sources.discard(str(receipt.cid))
        return judgement

    def _window(self, receipt: Record[ReceiptBody], score: float) -> None:
        """Add a passed receipt to its provider's open window of its (model, class) (kept in SQLite, so it
        survives restarts); a window that fills is closed, and when its flip excesses sum above the class's
        limit a window proof naming its receipts is signed, stored and counted: the provider is excluded."""
        body = receipt.body
        test = self.verifier.window_test(body.model, body.precision)
        if test is None:
            return
        closed = self.state.window_add((receipt.signer, body.model, body.precision), str(receipt.cid), score, test.size)
        total = sum(score for _, score in closed)
        if not closed or total <= test.limit:
            return
        entries = []
        for cid, score in closed:  # each was stored with its request before its score was added
            stored = self.state.get(cid)
            r = verify_record(stored[1], ReceiptBody) if stored is not None else None
            request = self.state.get(r.body.request) if r is not None else None
            if r is None or request is None:
                log.warning("window of provider %s: receipt %s or its request is gone; no window proof",
                            receipt.signer, cid)
                return
            entries.append((r, request[1], score))
        proof = self.verifier.window_proof(entries)
        self.state.put(proof.encode(), "window-proof")
        self.reputation.add_window_proof(receipt.signer, str(proof.cid))
        self.window_proofs += 1
        log.warning("window proof %s: provider %s, %d receipts of %s at %s: flip excess %.4g above the limit %.4g",
                    proof.cid, receipt.signer, len(entries), body.model, body.precision, total, test.limit)

    async def check_proof(self, proof: Record[FraudProofBody] | Record[WindowProofBody]) -> Recheck:
        """Re-check a fraud proof (one receipt) or a window proof (its receipts) by replay; store it as holding or
        false and count it for its provider or against its issuer."""
        window = proof.type == WindowProofBody.record_type
        recheck = await asyncio.to_thread(self.verifier.recheck_window if window else self.verifier.recheck, proof)
        kind = "window-proof" if window else "fraud-proof"
        self.state.put(proof.encode(), kind if recheck.holds else f"false-{kind}")
        self.reputation.add_recheck(str(proof.cid), recheck, window=window)
        return recheck

    def metrics(self) -> dict[str, float]:
        return {"verifier_audits_total": self.audited, "verifier_audit_errors_total": self.audit_errors,
                "verifier_audit_batches_total": self.audit_batches,
                "verifier_violations_total": self.violations, "verifier_window_proofs_total": self.window_proofs, "verifier_not_judged_total": self.not_judged,
                "verifier_receipts_refused_total": self.refused, "verifier_skipped_total": self.skipped,
                "verifier_queue": self._queue.qsize() if self._queue is not None else 0}

    # -- where records may be fetched -----------------------------------------------------------------

    async def _vouched(self, node: str, signer: str | None, offer: dict[str, Any] | None) -> tuple[str, str | None]:
        """`node` if records may be fetched from it for `signer`'s receipts, with the signer it vouches for.

        Only an operator's `--source` or the URL of a signed, unexpired offer of the receipt's own signer
        is ever fetched from: the offer given, one seen before, or the one `node` serves at its offer path
        (the only request that goes to a URL no signature names, at that one fixed path).
        """
        node = node.rstrip("/")
        if node in {s.rstrip("/") for s in self.config.sources}:
            return node, signer
        if signer is not None and self._offers.get(signer) == node and offer is None:
            return node, signer
        if offer is None:
            try:
                offer = (await self._node(node).offer(max_bytes=MAX_RECORD_BYTES)).record
            except NodeError as exc:
                if isinstance(exc, NodeUnreachable) and exc.reason in (NOT_JSON, UNEXPECTED):
                    raise UnverifiableReceipt(f"{node} serves no provider offer at /agora/v1/offer") from None
                raise _unfetchable(exc, node, "its offer") from None
        try:
            record = verify_record(offer, OfferBody)
        except RecordError:
            raise UnverifiableReceipt(f"the offer for {node} is not a validly signed provider offer") from None
        if record.body.expires_ms <= now_ms():
            raise UnverifiableReceipt(f"the offer for {node} has expired")
        if record.body.url.rstrip("/") != node or (signer is not None and record.signer != signer):
            self.refused += 1
            raise RequestError(f"{node} is not the URL of a signed offer of this receipt's provider; records are "
                               "fetched only from there", param="node", code="node_not_vouched")
        self._offers[record.signer] = node
        self._offered.setdefault(record.signer, set()).update((m.cid, record.body.precision)
                                                              for m in record.body.models)
        self._remember_ranges(record)
        return node, record.signer

    def _node(self, url: str) -> AgoraClient:
        assert self._http is not None
        return AgoraClient(url, self._http, timeout=10)

    async def _get_record(self, node: str, cid: str) -> bytes:
        """A record's bytes, at most MAX_RECORD_BYTES; errors name the node and the status, never its answer."""
        try:
            return await self._node(node).record_bytes(cid, max_bytes=MAX_RECORD_BYTES)
        except NodeError as exc:
            raise _unfetchable(exc, node, f"record {cid}") from None

    # -- routes -------------------------------------------------------------------------------------

    def _routes(self) -> APIRouter:
        r = APIRouter()

        @r.post("/agora/v1/verify")
        async def verify(req: VerifyRequest) -> dict[str, Any]:
            """Replay one receipt now (a user asking), whatever the audit fraction."""
            node = None
            if req.receipt is not None:
                receipt = verify_record(req.receipt, ReceiptBody)
                if req.node and not req.request:
                    node, _ = await self._vouched(req.node, receipt.signer, req.offer)
            elif req.receipt_cid and req.node:
                node, signer = await self._vouched(req.node, None, req.offer)
                receipt = await self._fetch_receipt(node, req.receipt_cid)
                if signer is not None and receipt.signer != signer:
                    raise RequestError(f"receipt {req.receipt_cid} is not signed by the provider whose offer names "
                                       f"{node}", param="receipt_cid", code="node_not_vouched")
            else:
                raise RequestError("give `receipt`, or `receipt_cid` with `node`", param="receipt")
            self._admit(receipt)
            request = _hex(req.request) if req.request else None
            j = await self.audit(receipt, node=node, request_bytes=request)
            return _judgement_json(j)

        @r.post("/agora/v1/receipts", status_code=202)
        async def submit(req: VerifyRequest) -> dict[str, Any]:
            """A receipt seen by a gateway or user; audited with probability audit_fraction."""
            if req.receipt is None:
                raise RequestError("give the `receipt` record", param="receipt")
            receipt = verify_record(req.receipt, ReceiptBody)
            request = _hex(req.request) if req.request else None
            # vouched first: the offer it names states the provider's classes and calibrated range
            node = (await self._vouched(req.node, receipt.signer, req.offer))[0] if req.node and not request else None
            self._admit(receipt)
            queued = self.offer(receipt, node=node, request_bytes=request)
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

        @r.post("/agora/v1/window-proofs")
        async def submit_window_proof(sub: ProofSubmission) -> dict[str, Any]:
            proof = verify_record(sub.record, WindowProofBody)
            try:
                rc = await self.check_proof(proof)
            except UnverifiableReceipt as exc:
                raise RequestError(str(exc), param="record", code="proof_not_checkable") from None
            return {"window_proof_cid": str(proof.cid), "holds": rc.holds, "provider": rc.provider,
                    "issuer": rc.issuer, "detail": rc.detail}

        @r.get("/agora/v1/window-proofs")
        async def window_proofs(after: Cursor = 0, limit: PageSize = 100) -> dict[str, Any]:
            return self.state.feed("window-proof", after, limit, "window_proofs")

        @r.get("/agora/v1/verdicts")
        async def verdicts(after: Cursor = 0, limit: PageSize = 100) -> dict[str, Any]:
            return self.state.feed("verdict", after, limit, "verdicts")

        @r.get("/agora/v1/reputation")
        async def reputation() -> dict[str, Any]:
            # `classes`: the (model, precision) pairs judged here; gateways route no traffic to any other.
            return {"verifier": str(self.identity.peer_id), "audit_fraction": self.config.audit_fraction,
                    "audited": self.audited, "classes": self.verifier.classes(), **self.reputation.to_json()}

        r.include_router(records_router(self.state))  # the receipts audited, verdicts and fraud proofs
        return r

    def _admit(self, receipt: Record[ReceiptBody]) -> None:
        """Refuse a receipt this verifier cannot replay for its own reasons (a class it does not hold, a range
        its record does not cover but the provider's offer does, a model it cannot read); a Violation is
        admitted (and signed). Anyone may submit any receipt: judging only what it holds keeps a stranger from
        turning an honest provider's receipts of another class into violations here."""
        if (why := self._not_here(receipt)) is not None:
            self.refused += 1
            raise RequestError(f"receipt {receipt.cid} is not judged here: {why}", param="receipt",
                               code="receipt_not_replayable")
        try:
            self.verifier.admissible(receipt)
        except Violation:
            pass
        except UnverifiableReceipt as exc:
            self.refused += 1
            raise RequestError(str(exc), param="receipt", code="receipt_not_replayable") from None

    async def _fetch_receipt(self, node: str, cid: str) -> Record[ReceiptBody]:
        data = await self._get_record(node, cid)
        try:
            receipt = verify_record(data, ReceiptBody)
        except RecordError:
            raise UnverifiableReceipt(f"{node} answered {cid} with something that is not a signed receipt") from None
        if str(receipt.cid) != cid:
            raise RecordError(f"{node} returned a receipt whose CID is {receipt.cid}, not {cid}")
        return receipt


def _unfetchable(exc: NodeError, node: str, what: str) -> UnverifiableReceipt:
    """Why `what` could not be fetched from a user-named node, without echoing anything it answered."""
    if isinstance(exc, NodeRefused):
        return UnverifiableReceipt(f"{node} did not serve {what} (HTTP {exc.status})")
    reason = exc.reason if isinstance(exc, NodeUnreachable) else type(exc).__name__
    return UnverifiableReceipt(f"cannot fetch {what} from {node!r}: {reason}")


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

