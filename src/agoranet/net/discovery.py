"""The one interface every discovery mechanism implements: HTTP gossip now, libp2p (Kademlia DHT for
finding offers, GossipSub for heartbeats) later, behind the same methods.

Discovery hands out only records it has verified: signed by their signer, not expired, not from the
future. Callers still check that a provider's receipts are signed by the key that made the offer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from agoranet.core.records import OfferBody, Record

OfferSource = Callable[[], Record[OfferBody]]


@dataclass(frozen=True)
class MembershipEvent:
    """A peer joined (first live heartbeat or offer seen) or left (missed its heartbeats)."""

    kind: Literal["joined", "left"]
    peer_id: str
    url: str


def offers_model(offer: Record[OfferBody], model: str) -> bool:
    """Whether an offer sells `model`, named by CID or by name."""
    return any(model in (m.cid, m.name) for m in offer.body.models)


class Discovery(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    def announce(self, offer: OfferSource) -> None:
        """Publish this node's offer; `offer()` is re-read before each publication (offers re-sign)."""
        ...

    async def find_offers(self, model: str | None) -> list[Record[OfferBody]]:
        """Verified, live offers for a model CID or name, or all of them for None (async: a DHT lookup
        goes to the network)."""
        ...

    def members(self) -> dict[str, str]:
        """Live peers: peer id -> URL."""
        ...

    def watch(self) -> AsyncIterator[MembershipEvent]:
        """Membership changes from now on, until discovery stops."""
        ...
