"""A gateway's credits: each API key spends from its own account in the gateway's logged ledger.

A request holds its maximum price in escrow before any provider sees it, and settles on what the
providers' signed receipts charge once it is answered; whatever is left goes back to the user, and
a request that fails is refunded whole. Providers fetch a signed statement of their earnings with
inclusion proofs (`GET /agora/v1/credits/statement/{peer_id}`) and check it against the log.

The maximum price is an upper bound, not a guess: for the prompt it counts 3 tokens per UTF-8 byte
of every message (a byte-level tokenizer makes one token per byte, BPE fewer, and a chat template
such as agora-tiny's adds at most "# " per line) plus 16 per message and 32 for the template, capped
by the largest context any candidate offers (an engine refuses longer prompts), at the dearest
candidate's input price, plus max_tokens at the dearest output price. One receipt is paid per request:
a provider signs its receipt only when its part finishes, and the gateway stops at the first part that
finishes (a continuation after a failover charges the prompt plus the tokens it adds, no more). The
hold is a ceiling either way: no receipt is ever paid beyond what was held.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from agoranet.core.errors import RequestError
from agoranet.core.records import ReceiptBody, Record, token_charge
from agoranet.log.credits import OPERATOR, CreditLedger, provider, user, verifier
from agoranet.log.errors import CreditError, InsufficientCredits, InvalidAmount, UnknownAccount
from agoranet.log.records import CreditMoveBody
from agoranet.node.keys import KeyStore
from agoranet.wire.openai import ChatCompletionRequest, CompletionRequest, error_body

__all__ = ["CreditsRole", "Escrow", "PriceBound", "fund_key", "max_price", "prompt_token_bound"]

log = logging.getLogger(__name__)

PPM = 1_000_000
TOKENS_PER_BYTE = 3
TOKENS_PER_MESSAGE = 16
TEMPLATE_TOKENS = 32
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


@dataclass(frozen=True)
class PriceBound:
    """What one candidate provider asks, as far as the maximum price is concerned."""

    input_per_mtok: int
    output_per_mtok: int
    context_length: int = 0  # 0: not offered, no cap


def prompt_token_bound(req: ChatCompletionRequest | CompletionRequest) -> int:
    """At least as many tokens as any provider's prompt for this request can count (see the module doc)."""
    if isinstance(req, ChatCompletionRequest):
        texts = [m.role + "\n" + m.text() for m in req.messages]
    else:
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    return sum(TOKENS_PER_BYTE * len(t.encode()) + TOKENS_PER_MESSAGE for t in texts) + TEMPLATE_TOKENS


def max_price(prompt_tokens: int, max_tokens: int, bounds: Iterable[PriceBound], *, fee_ppm: int = 0) -> int:
    """The most a request can cost in micro-credits: the provider's charge (rounded up, as receipts
    round) at the dearest candidate's prices, plus the verifier fee; at least 1, so there is a hold."""
    bounds = list(bounds)
    contexts = [b.context_length for b in bounds]
    if contexts and all(contexts):
        prompt_tokens = min(prompt_tokens, max(contexts))
    cost = token_charge(prompt_tokens, max_tokens, max(b.input_per_mtok for b in bounds),
                        max(b.output_per_mtok for b in bounds))
    return max(1, cost + math.ceil(cost * fee_ppm / PPM))


@dataclass
class Escrow:
    """One request's hold: who pays, how much is held, and whether it is settled yet."""

    id: str
    account: str
    held: int
    settled: bool = False
    charged: int = 0  # providers' share, once settled
    fee: int = 0
    balance: int = 0  # the user's balance after settling
    payments: list[tuple[str, int]] = field(default_factory=list)


def _escrow_id(request_id: str) -> str:
    """Unique per request (the same request sent twice has the same id) and still naming it in the log."""
    name = request_id if _SAFE_ID.match(request_id) else hashlib.sha256(request_id.encode()).hexdigest()[:32]
    return f"{name}.{secrets.token_hex(6)}"


def fund_key(ledger: CreditLedger, key_id: str, amount: int) -> list[Record[CreditMoveBody]]:
    """Operator → the key's account; the operator mints whatever it lacks first (both moves are logged)."""
    moves = []
    if (short := amount - ledger.balance(OPERATOR)) > 0:
        moves.append(ledger.mint(short))
    moves.append(ledger.fund(user(key_id), amount))
    return moves


class CreditsRole:
    """Holds, settles and refunds each charged request; serves balances and providers' earnings statements."""

    def __init__(self, ledger: CreditLedger, keys: KeyStore | None, *, verifier_fee_ppm: int = 0) -> None:
        if not 0 <= verifier_fee_ppm <= PPM:
            raise ValueError(f"verifier fee is in parts per million, 0 to {PPM}; got {verifier_fee_ppm}")
        self.ledger, self.keys, self.verifier_fee_ppm = ledger, keys, verifier_fee_ppm
        self._open: dict[str, Escrow] = {}  # escrows held and not yet settled
        self._lock = threading.Lock()  # a stream's end and its background task may both settle
        self.router = self._routes()

    async def start(self) -> None:
        """Refund the holds a crashed run left open: their streams died with it, and no receipt of theirs
        was relayed as paid, so nobody is owed anything and the user gets the credits back."""
        for request_id in await asyncio.to_thread(self.ledger.open_escrows):
            await asyncio.to_thread(self.ledger.settle_many, request_id, [])
            log.warning("refunded a hold left open by an earlier run", extra={"escrow": request_id})

    async def stop(self) -> None:
        """Refund every hold still open (streams cut off by shutdown): no credits stay locked up."""
        for escrow in list(self._open.values()):
            self.settle_now(escrow, [], verifier_peer=None)

    def status(self) -> dict[str, Any]:
        balances = self.ledger.balances()
        return {"credits": {
            "accounts": sum(1 for name in balances if not name.startswith("escrow:") and name != "issuance"),
            "users": sum(v for k, v in balances.items() if k.startswith("user:")),
            "providers": sum(v for k, v in balances.items() if k.startswith("provider:")),
            "verifiers": sum(v for k, v in balances.items() if k.startswith("verifier:")),
            "operator": balances.get(OPERATOR, 0),
            "held": sum(v for k, v in balances.items() if k.startswith("escrow:")),
            "open_requests": len(self._open),
            "by_account": self.accounts(balances),
        }}

    def accounts(self, balances: dict[str, int], limit: int = 200) -> list[dict[str, Any]]:
        """Each user's and provider's balance (users named by their key), largest first, at most `limit`."""
        keys = {k.id: k for k in self.keys.list()} if self.keys is not None else {}
        rows = []
        for account, balance in balances.items():
            kind, _, ident = account.partition(":")
            if kind not in ("user", "provider", "verifier"):
                continue
            row: dict[str, Any] = {"kind": kind, "id": ident, "balance": balance}
            if kind == "user" and (key := keys.get(ident)) is not None:
                row |= {"name": key.name, "charged": key.charged, "used_tokens": key.used_tokens,
                        "requests": key.requests, "revoked": key.revoked}
            rows.append(row)
        return sorted(rows, key=lambda r: (r["kind"], -r["balance"]))[:limit]

    # -- charging ---------------------------------------------------------------------------------

    async def balance(self, key_id: str) -> int:
        return await asyncio.to_thread(self.ledger.balance, user(key_id))

    async def paid(self, receipt_cid: str) -> bool:
        """Whether a receipt was paid already: a receipt is paid once, whichever request it comes back with."""
        return bool(await asyncio.to_thread(self.ledger.paid_receipts, [receipt_cid]))

    async def hold(self, key_id: str, request_id: str, amount: int) -> Escrow:
        """Reserve `amount` from the key's account, or refuse with 402 and change nothing."""
        escrow = Escrow(_escrow_id(request_id), user(key_id), amount)
        try:
            await asyncio.to_thread(self.ledger.hold, escrow.id, escrow.account, amount)
        except InvalidAmount as exc:  # e.g. a price so high the hold is past what any ledger holds
            raise RequestError(f"this request cannot be held: {exc}", code="invalid_price", param="max_tokens") from None
        except InsufficientCredits:
            have = await asyncio.to_thread(self.ledger.balance, escrow.account)
            raise RequestError(
                f"this key has {have} micro-credits; this request may cost up to {amount} (prompt, max_tokens and "
                f"the providers' prices). Lower max_tokens, or ask the gateway operator to run "
                f"`agora keys fund {key_id} AMOUNT`", status=402, code="insufficient_quota", type="insufficient_quota",
            ) from None
        self._open[escrow.id] = escrow
        return escrow

    def payments(self, escrow: Escrow, receipts: Iterable[Record[ReceiptBody]], verifier_peer: str | None,
                 ) -> tuple[list[tuple[str, int]], int]:
        """Each provider's charge from its receipts (never more than the hold), and the verifier fee."""
        budget = escrow.held
        owed: dict[str, int] = {}
        for receipt in receipts:
            charged = receipt.body.price.charged
            paid = min(charged, budget)
            if paid < charged:
                log.warning("receipt charges more than the hold", extra={
                    "escrow": escrow.id, "provider": receipt.signer, "charged": charged, "paid": paid})
            if paid:
                owed[provider(receipt.signer)] = owed.get(provider(receipt.signer), 0) + paid
            budget -= paid
        fee = 0
        if self.verifier_fee_ppm and verifier_peer is not None:
            fee = min(math.ceil(sum(owed.values()) * self.verifier_fee_ppm / PPM), budget)
        payments = list(owed.items()) + ([(verifier(verifier_peer), fee)] if fee and verifier_peer else [])
        return payments, fee

    def settle_now(self, escrow: Escrow, receipts: Iterable[Record[ReceiptBody]], *, verifier_peer: str | None) -> Escrow:
        """Pay the receipts' charges from the hold and refund the rest; once per escrow, later calls do nothing.

        Blocking (one SQLite commit): a cancelled stream may await nothing more, so it settles this way.
        """
        with self._lock:
            if escrow.settled:
                return escrow
            escrow.settled = True
        receipts = list(receipts)
        payments, fee = self.payments(escrow, receipts, verifier_peer)
        try:
            self.ledger.settle_many(escrow.id, payments, [str(r.cid) for r in receipts])
        except CreditError:
            log.exception("settling failed; refunding the whole hold", extra={"escrow": escrow.id})
            payments, fee = [], 0
            self.ledger.settle_many(escrow.id, [])
        finally:
            self._open.pop(escrow.id, None)
        escrow.payments, escrow.fee = payments, fee
        escrow.charged = sum(amount for _, amount in payments) - fee
        escrow.balance = self.ledger.balance(escrow.account)
        return escrow

    async def settle(self, escrow: Escrow, receipts: Iterable[Record[ReceiptBody]], *,
                     verifier_peer: str | None) -> Escrow:
        return await asyncio.to_thread(self.settle_now, escrow, list(receipts), verifier_peer=verifier_peer)

    # -- routes -----------------------------------------------------------------------------------

    def _routes(self) -> APIRouter:
        r = APIRouter(prefix="/agora/v1/credits", tags=["credits"])

        @r.get("/balance")
        def balance(request: Request) -> JSONResponse:
            """The calling key's balance (Authorization: Bearer agk_…)."""
            if self.keys is None:
                return JSONResponse(error_body("this gateway has no API keys", code="no_keys"), 404)
            try:
                key = self.keys.identify(request.headers.get("authorization"))
            except RequestError as exc:
                return JSONResponse(error_body(str(exc), type=exc.type, code=exc.code), exc.status)
            account = user(key.id)
            return JSONResponse({"key": key.id, "account": account, "balance": self.ledger.balance(account)})

        @r.get("/statement/{peer_id}")
        def statement(peer_id: str) -> JSONResponse:
            """A signed statement of every credit paid to this provider, with inclusion proofs, and the
            signed tree head it names."""
            try:
                proof = self.ledger.earnings_proof(provider(peer_id))
            except UnknownAccount as exc:
                return JSONResponse(error_body(str(exc), param="peer_id", code="invalid_peer_id"), 400)
            head = self.ledger.log.head(proof.statement.body.log_size)
            return JSONResponse({"proof": proof.to_json(), "head": head.to_json()})

        return r
