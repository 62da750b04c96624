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

log = logging.getLogger(__name__)


@dataclass
class ProviderStanding:
    verified: int = 0
    passed: int = 0
    excluded: bool = False
    fraud_proofs: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # receipts signed for what it may not sell


class VerifierLink:
    def __init__(self, verifiers: list[str], *, interval_s: float = 2.0, timeout_s: float = 5.0) -> None:
        self.verifiers = [v.rstrip("/") for v in verifiers]
        self.interval_s = interval_s
        self.standing: dict[str, ProviderStanding] = {}
        self.peer_ids: dict[str, str] = {}  # verifier URL -> the peer id it names in its reputation table
        self.submitted = 0
        # (model CID, precision) pairs some verifier answering holds tolerances for; None until one answers
        self.classes: set[tuple[str, str]] | None = None
        self._http = httpx.AsyncClient(timeout=timeout_s)
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
        for url in self.verifiers:
            try:
                answer = (await self._http.get(f"{url}/agora/v1/reputation")).json()
                table = answer["providers"]
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                log.warning("verifier %s did not answer: %s", url, exc)
                continue
            if isinstance(answer.get("verifier"), str):
                self.peer_ids[url] = answer["verifier"]
            if isinstance(held := answer.get("classes"), dict):
                classes = (classes or set()) | {(str(m), str(p)) for m, ps in held.items()
                                                if isinstance(ps, list) for p in ps}
            for peer, row in table.items():
                s = merged.setdefault(peer, ProviderStanding())
                s.verified += int(row.get("verified", 0))
                s.passed += int(row.get("passed", 0))
                s.excluded = s.excluded or bool(row.get("excluded"))
                s.fraud_proofs += [p for p in row.get("fraud_proofs", []) if p not in s.fraud_proofs]
                s.violations += [r for r in row.get("violations", []) if r not in s.violations]
        for peer, s in merged.items():
            if s.excluded and not self.excluded(peer):
                log.warning("provider %s excluded: fraud proof %s, violation by receipt %s", peer,
                            s.fraud_proofs[:1], s.violations[:1])
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
            item = {"receipt": receipt.to_json(), "node": node_url, "offer": offer.to_json() if offer else None}
            for url in self.verifiers:
                try:
                    await self._http.post(f"{url}/agora/v1/receipts", json=item)
                    self.submitted += 1
                except httpx.HTTPError as exc:
                    log.warning("could not hand a receipt to verifier %s: %s", url, exc)
