"""A gateway's link to its verifiers: it hands them the receipts it relays and follows their
reputation tables, so a provider with a proven fraud stops getting traffic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import httpx

from agoranet.core.records import OfferBody, ReceiptBody, Record
from agoranet.core.tasks import cancel_and_wait
from agoranet.engine.upstream import UPSTREAM_PRECISION
from agoranet.net.agora_client import AgoraClient, NodeError, NodeRefused
from agoranet.wire.agora import VerifyRequest

log = logging.getLogger(__name__)


@dataclass
class ProviderStanding:
    verified: int = 0
    passed: int = 0
    excluded: bool = False
    fraud_proofs: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # receipts signed for what it may not sell
    window_proofs: list[str] = field(default_factory=list)  # failed window tests (verify.window)


class VerifierLink:
    def __init__(self, verifiers: list[str], *, interval_s: float = 2.0, timeout_s: float = 5.0) -> None:
        self.verifiers = [v.rstrip("/") for v in verifiers]
        self.interval_s = interval_s
        self.standing: dict[str, ProviderStanding] = {}
        self.peer_ids: dict[str, str] = {}  # verifier URL -> the peer id it names in its reputation table
        self.submitted = 0
        # (model CID, precision) pairs some verifier answering holds tolerances for; None until one answers
        self.classes: set[tuple[str, str]] | None = None
        self._held: dict[str, set[tuple[str, str]]] = {}  # verifier URL -> the classes it said it holds
        self._http = httpx.AsyncClient(timeout=timeout_s)
        self._clients = [AgoraClient(url, self._http, timeout=timeout_s) for url in self.verifiers]
        self._outbox: asyncio.Queue[tuple[Record[ReceiptBody], str, Record[OfferBody] | None]] = \
            asyncio.Queue(maxsize=10_000)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.verifiers:
            self._tasks = [asyncio.create_task(self._follow(), name="agora-reputation"),
                           asyncio.create_task(self._send(), name="agora-audit-outbox")]

    async def stop(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        await self._http.aclose()

    def excluded(self, peer: str) -> bool:
        s = self.standing.get(peer)
        return s is not None and s.excluded

    def verified(self, peer: str) -> bool:
        s = self.standing.get(peer)
        return s is not None and s.passed > 0 and not s.excluded

    def judgeable(self, model: str, precision: str) -> bool:
        """Whether a verifier can judge receipts of this model and precision (True while none has said)."""
        return self.classes is None or (model, precision) in self.classes

    def _holds(self, url: str, receipt: Record[ReceiptBody]) -> bool:
        """Whether to hand `receipt` to the verifier at `url`: one that lacks tolerances for its (model,
        precision) would sign it a violation, though another verifier sells that class. The gateway relays only
        receipts declaring what their offer sells (`Gateway._receipt_part`) and routes only to classes some
        verifier holds, so what is withheld here is judged there. Upstream receipts go to all (refused there)."""
        held = self._held.get(url)
        body = receipt.body
        return held is None or body.precision == UPSTREAM_PRECISION or (body.model, body.precision) in held

    def fee_payee(self) -> str | None:
        """The verifier that verification fees go to: the first configured one whose peer id is known."""
        return next((self.peer_ids[url] for url in self.verifiers if url in self.peer_ids), None)

    def submit(self, receipt: Record[ReceiptBody], node_url: str, offer: Record[OfferBody] | None = None) -> None:
        """Queue a relayed receipt for the verifiers (they audit a share of what they are sent); the
        provider's signed offer vouches for `node_url`, the only place a verifier fetches its records."""
        if self.verifiers:
            with contextlib.suppress(asyncio.QueueFull):  # auditing is sampled anyway; never block a user
                self._outbox.put_nowait((receipt, node_url, offer))

    async def refresh(self) -> None:
        """Merge every verifier's table: a fraud proof from any of them excludes the provider."""
        merged: dict[str, ProviderStanding] = {}
        classes: set[tuple[str, str]] | None = None
        for node in self._clients:
            try:
                answer = await node.reputation()
            except NodeError as exc:
                log.warning("verifier %s did not answer: %s", node.url, exc)
                continue
            if answer.verifier is not None:
                self.peer_ids[node.url] = answer.verifier
            if answer.classes is not None:
                self._held[node.url] = {(m, p) for m, ps in answer.classes.items() for p in ps}
                classes = (classes or set()) | self._held[node.url]
            for peer, row in answer.providers.items():
                s = merged.setdefault(peer, ProviderStanding())
                s.verified += row.verified
                s.passed += row.passed
                s.excluded = s.excluded or row.excluded
                s.fraud_proofs += [p for p in row.fraud_proofs if p not in s.fraud_proofs]
                s.violations += [r for r in row.violations if r not in s.violations]
                s.window_proofs += [p for p in row.window_proofs if p not in s.window_proofs]
        for peer, s in merged.items():
            if s.excluded and not self.excluded(peer):
                log.warning("provider %s excluded: fraud proof %s, violation by receipt %s, window proof %s", peer,
                            s.fraud_proofs[:1], s.violations[:1], s.window_proofs[:1])
        self.standing = merged
        if classes is not None:  # a round with no answer keeps what was known
            self.classes = classes

    async def _follow(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval_s)

    async def _send(self) -> None:
        while True:
            receipt, node_url, offer = await self._outbox.get()
            item = VerifyRequest(receipt=receipt.to_json(), node=node_url, offer=offer.to_json() if offer else None)
            for node in self._clients:
                if not self._holds(node.url, receipt):
                    continue
                try:
                    await node.submit_receipt(item)
                    self.submitted += 1
                except NodeRefused as exc:  # handed over; it will not audit this one (e.g. an upstream receipt)
                    self.submitted += 1
                    log.debug("verifier %s refused a receipt: %s", node.url, exc.message)
                except NodeError as exc:
                    log.warning("could not hand a receipt to verifier %s: %s", node.url, exc)
