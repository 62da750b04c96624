"""Credits: a double-entry ledger whose every move is a signed record appended to the gateway's log.

Accounts are named `operator`, `user:NAME`, `provider:PEER`, `verifier:PEER` and `escrow:REQUEST`;
`issuance` is the ledger's equity, the one account that goes negative (minus all credits minted).
Each move debits one account and credits another by the same whole number of micro-credits, so the
sum over all accounts is always zero, and no other balance may drop below zero. Balances and the log
entry of each move are written in one SQLite transaction: the ledger never disagrees with its log.
Every amount and every balance stays within ±MAX_CREDITS, far inside SQLite's 64-bit integers, so no
column ever silently turns into floats.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agoranet.core.errors import RecordError
from agoranet.core.records import Record, decode_record, sign_record, verify_record
from agoranet.log.errors import (
    EscrowError, InsufficientCredits, InvalidAmount, InvalidProof, InvalidStatement, UnknownAccount,
)
from agoranet.log.merkle import leaf_hash, verify_inclusion
from agoranet.log.records import CreditMoveBody, EarningsStatementBody, MoveKind, verify_tree_head
from agoranet.log.transparency import LogTransaction, TransparencyLog, cid_key, key_cid

__all__ = [
    "CreditLedger", "EarningsProof", "ISSUANCE", "MAX_CREDITS", "OPERATOR", "replay_balances", "verify_earnings",
    "user", "provider", "verifier",
]

OPERATOR = "operator"
ISSUANCE = "issuance"
# The most one move may carry and any balance may reach (10^12 credits); SQLite stores integers up to
# 2^63 - 1 and turns a sum past that into a float, which no audit would notice.
MAX_CREDITS = 10**18
_ACCOUNT = re.compile(r"^(operator|issuance|(user|provider|verifier|escrow):[^\s:][^\s]{0,199})$")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS credit_accounts (
    name TEXT PRIMARY KEY,
    balance INTEGER NOT NULL CHECK (balance >= 0 OR name = '{ISSUANCE}')
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS credit_moves (
    seq INTEGER PRIMARY KEY,
    log_index INTEGER NOT NULL,
    debit TEXT NOT NULL,
    credit TEXT NOT NULL,
    amount INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS credit_moves_by_credit ON credit_moves (credit, seq);
CREATE TABLE IF NOT EXISTS credit_escrows (
    request_id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    held INTEGER NOT NULL,
    settled INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS credit_paid_receipts (
    cid TEXT PRIMARY KEY,
    request_id TEXT NOT NULL
) WITHOUT ROWID;
"""


def user(name: str) -> str:
    return f"user:{name}"


def provider(peer: str) -> str:
    return f"provider:{peer}"


def verifier(peer: str) -> str:
    return f"verifier:{peer}"


def _escrow(request_id: str) -> str:
    return f"escrow:{request_id}"


def _check_account(name: str) -> str:
    if not isinstance(name, str) or not _ACCOUNT.match(name):
        raise UnknownAccount(f"{str(name)[:80]!r} is not an account name")
    return name


def _check_amount(amount: int, what: str = "amount") -> int:
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_CREDITS:
        raise InvalidAmount(f"{what} must be a whole number of micro-credits from 1 to {MAX_CREDITS}, got {amount!r}")
    return amount


class CreditLedger:
    """The gateway's ledger, kept in its log's database and signed with its log's key."""

    def __init__(self, log: TransparencyLog) -> None:
        self.log = log
        with log.transaction() as tx:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    tx.conn.execute(statement)

    # -- reading ----------------------------------------------------------------------------------

    def balance(self, account: str) -> int:
        with self.log.transaction() as tx:
            return _balance(tx, _check_account(account))

    def balances(self) -> dict[str, int]:
        with self.log.transaction() as tx:
            return dict(tx.conn.execute("SELECT name, balance FROM credit_accounts ORDER BY name"))

    def escrow(self, request_id: str) -> tuple[str, int, bool] | None:
        """(user, amount held, settled?) of a request's escrow, or None if none was held."""
        with self.log.transaction() as tx:
            row = tx.conn.execute(
                "SELECT user, held, settled FROM credit_escrows WHERE request_id = ?", (request_id,)
            ).fetchone()
        return None if row is None else (row[0], row[1], bool(row[2]))

    def paid_receipts(self, cids: Iterable[str]) -> set[str]:
        """Which of these receipt CIDs a settlement has paid already (each is paid once, ever)."""
        cids = list(cids)
        with self.log.transaction() as tx:
            return {cid for cid in cids
                    if tx.conn.execute("SELECT 1 FROM credit_paid_receipts WHERE cid = ?", (cid,)).fetchone()}

    def open_escrows(self) -> list[str]:
        """Request ids whose hold is neither settled nor refunded (after a crash: holds nobody will settle)."""
        with self.log.transaction() as tx:
            return [r for (r,) in tx.conn.execute("SELECT request_id FROM credit_escrows WHERE settled = 0")]

    # -- moves ------------------------------------------------------------------------------------

    def mint(self, amount: int) -> Record[CreditMoveBody]:
        """Create credits for the operator to hand out (the only move that grows circulation)."""
        with self.log.transaction() as tx:
            return self._move(tx, "mint", ISSUANCE, OPERATOR, _check_amount(amount))

    def fund(self, account: str, amount: int) -> Record[CreditMoveBody]:
        """Operator → user: give a user credits to spend."""
        if not _check_account(account).startswith("user:"):
            raise UnknownAccount(f"only user accounts are funded, not {account!r}")
        with self.log.transaction() as tx:
            return self._move(tx, "fund", OPERATOR, account, _check_amount(amount))

    def hold(self, request_id: str, account: str, max_price: int) -> Record[CreditMoveBody]:
        """User → escrow: reserve a request's maximum price before it is served."""
        _check_account(account)
        _check_amount(max_price, "max price")
        escrow = _check_account(_escrow(request_id))
        with self.log.transaction() as tx:
            if tx.conn.execute("SELECT 1 FROM credit_escrows WHERE request_id = ?", (request_id,)).fetchone():
                raise EscrowError(f"request {request_id!r} already has an escrow")
            move = self._move(tx, "hold", account, escrow, max_price, request_id)
            tx.conn.execute(
                "INSERT INTO credit_escrows (request_id, user, held) VALUES (?, ?, ?)", (request_id, account, max_price)
            )
            return move

    def settle(
        self, request_id: str, provider_account: str, cost: int, *, verifier_account: str | None = None,
        verifier_fee: int = 0,
    ) -> list[Record[CreditMoveBody]]:
        """Escrow → provider (cost) and verifier (fee); the rest goes back to the user. Once per request."""
        for value, what in ((cost, "cost"), (verifier_fee, "verifier fee")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidAmount(f"{what} must be a whole number of micro-credits, at least zero, got {value!r}")
        if verifier_fee and verifier_account is None:
            raise InvalidAmount("a verifier fee needs a verifier account to pay")
        payments = [(provider_account, cost)]
        if verifier_account is not None:
            payments.append((verifier_account, verifier_fee))
        return self.settle_many(request_id, payments)

    def settle_many(self, request_id: str, payments: Iterable[tuple[str, int]],
                    receipts: Iterable[str] = ()) -> list[Record[CreditMoveBody]]:
        """Escrow → each (account, amount) in order, the rest back to the user; no payments refunds it all.

        A request served by several providers (failover) pays each of them from one escrow. Once per request;
        `receipts` (the CIDs paid for) are recorded in the same transaction, and one already paid is refused.
        """
        receipts = list(receipts)
        payments = list(payments)
        for account, amount in payments:
            _check_account(account)
            if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= MAX_CREDITS:
                raise InvalidAmount(f"payment to {account} must be a whole number of micro-credits from 0 to "
                                    f"{MAX_CREDITS}, got {amount!r}")
        escrow = _escrow(request_id)
        total = sum(amount for _, amount in payments)
        with self.log.transaction() as tx:
            row = tx.conn.execute(
                "SELECT user, held, settled FROM credit_escrows WHERE request_id = ?", (request_id,)
            ).fetchone()
            if row is None:
                raise EscrowError(f"request {request_id!r} has no escrow to settle")
            account, held, settled = row
            if settled:
                raise EscrowError(f"request {request_id!r} was already settled")
            if total > held:
                shown = " + ".join(str(amount) for _, amount in payments)
                raise EscrowError(f"request {request_id!r} costs {shown}, more than the {held} held")
            for cid in receipts:
                if tx.conn.execute("SELECT 1 FROM credit_paid_receipts WHERE cid = ?", (cid,)).fetchone():
                    raise EscrowError(f"receipt {cid} was paid already; a receipt is paid once")
                tx.conn.execute("INSERT INTO credit_paid_receipts (cid, request_id) VALUES (?, ?)", (cid, request_id))
            moves = [self._move(tx, "settle", escrow, payee, amount, request_id) for payee, amount in payments if amount]
            if refund := held - total:
                moves.append(self._move(tx, "refund", escrow, account, refund, request_id))
            tx.conn.execute("UPDATE credit_escrows SET settled = 1 WHERE request_id = ?", (request_id,))
            tx.conn.execute("DELETE FROM credit_accounts WHERE name = ? AND balance = 0", (escrow,))
            return moves

    def _move(
        self, tx: LogTransaction, kind: MoveKind, debit: str, credit: str, amount: int, request_id: str = ""
    ) -> Record[CreditMoveBody]:
        if debit == credit:
            raise InvalidAmount(f"a move from {debit} to itself changes nothing")
        if debit != ISSUANCE:
            have = _balance(tx, debit)
            if have < amount:
                raise InsufficientCredits(f"{debit} has {have} micro-credits, {amount} needed")
        elif _balance(tx, debit) - amount < -MAX_CREDITS:
            raise InvalidAmount(f"minting {amount} would put more than {MAX_CREDITS} micro-credits in circulation")
        if _balance(tx, credit) + amount > MAX_CREDITS:
            raise InvalidAmount(f"{credit} would hold more than {MAX_CREDITS} micro-credits")
        (seq,) = tx.conn.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM credit_moves").fetchone()
        record = sign_record(self.log.identity, CreditMoveBody(
            seq=seq, kind=kind, debit=debit, credit=credit, amount=amount, request_id=request_id,
            timestamp_ms=int(time.time() * 1000),
        ))
        entry = tx.append(record)
        _add(tx, debit, -amount)
        _add(tx, credit, amount)
        tx.conn.execute(
            "INSERT INTO credit_moves (seq, log_index, debit, credit, amount) VALUES (?, ?, ?, ?, ?)",
            (seq, entry.index, debit, credit, amount),
        )
        return record

    # -- earnings ---------------------------------------------------------------------------------

    def earnings_proof(self, account: str) -> EarningsProof:
        """A signed statement of every move that credited `account`, with inclusion proofs for each."""
        _check_account(account)
        with self.log.transaction() as tx:  # one snapshot: no move lands between statement and proofs
            indices = [i for (i,) in tx.conn.execute(
                "SELECT log_index FROM credit_moves WHERE credit = ? ORDER BY seq", (account,)
            )]
            amounts = [a for (a,) in tx.conn.execute(
                "SELECT amount FROM credit_moves WHERE credit = ? ORDER BY seq", (account,)
            )]
            size = self.log.size
            records = [self.log.entry(i).record for i in indices]
            paths = [tuple(self.log.inclusion_path(i, size)) for i in indices]
            root = self.log.root(size)
        statement = sign_record(self.log.identity, EarningsStatementBody(
            account=account, moves=[str(key_cid(cid_key(r))) for r in records], total=sum(amounts),
            log_size=size, log_root=root.hex(), issued_ms=int(time.time() * 1000),
        ))
        return EarningsProof(statement, tuple(bytes(r) for r in records), tuple(indices), tuple(paths))

    def replay(self) -> dict[str, int]:
        """Balances recomputed from the credit moves in the log (an audit of the balance table)."""
        records = []
        start = 0
        while start < self.log.size:
            page = self.log.entries(start, self.log.size)
            records += [e.record for e in page]
            start = page[-1].index + 1
        return replay_balances(records, ledger_id=self.log.log_id)


def _balance(tx: LogTransaction, account: str) -> int:
    row = tx.conn.execute("SELECT balance FROM credit_accounts WHERE name = ?", (account,)).fetchone()
    return 0 if row is None else row[0]


def _add(tx: LogTransaction, account: str, amount: int) -> None:
    # the CHECK constraint (no negative balance but issuance's) backs up the check in _move
    tx.conn.execute(
        "INSERT INTO credit_accounts (name, balance) VALUES (?, 0) ON CONFLICT(name) DO NOTHING", (account,)
    )
    tx.conn.execute("UPDATE credit_accounts SET balance = balance + ? WHERE name = ?", (amount, account))


def replay_balances(records: Iterable[bytes], *, ledger_id: str | None = None) -> dict[str, int]:
    """Balances from a log's records: checks each credit move's signature, order and funds."""
    balances: dict[str, int] = {}
    expected_seq = 0
    for data in records:
        try:
            record = decode_record(data)
        except RecordError:
            continue  # not every log entry is a record type this process knows; moves always are
        if record.type != CreditMoveBody.record_type or (ledger_id and record.signer != ledger_id):
            continue
        move: CreditMoveBody = verify_record(data, CreditMoveBody).body
        if not 0 < move.amount <= MAX_CREDITS:
            raise InvalidStatement(f"credit move {move.seq} moves {move.amount}, outside 1..{MAX_CREDITS}")
        if move.seq != expected_seq:
            raise InvalidStatement(f"credit move {move.seq} found where {expected_seq} was expected")
        expected_seq += 1
        balances[move.debit] = balances.get(move.debit, 0) - move.amount
        balances[move.credit] = balances.get(move.credit, 0) + move.amount
        if move.debit != ISSUANCE and balances[move.debit] < 0:
            raise InvalidStatement(f"credit move {move.seq} overdraws {move.debit}")
        if balances[move.credit] > MAX_CREDITS or balances[move.debit] < -MAX_CREDITS:
            raise InvalidStatement(f"credit move {move.seq} takes a balance past {MAX_CREDITS}")
    return {name: value for name, value in sorted(balances.items()) if value or not name.startswith("escrow:")}


@dataclass(frozen=True)
class EarningsProof:
    """A signed earnings statement plus the move records and the proof that each is in the log."""

    statement: Record[EarningsStatementBody]
    moves: tuple[bytes, ...]
    indices: tuple[int, ...]
    paths: tuple[tuple[bytes, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "statement": self.statement.to_json(),
            "moves": [m.hex() for m in self.moves],
            "indices": list(self.indices),
            "paths": [[h.hex() for h in path] for path in self.paths],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EarningsProof:
        try:
            statement = verify_record(data["statement"], EarningsStatementBody)
            return cls(
                statement,
                tuple(bytes.fromhex(m) for m in data["moves"]),
                tuple(int(i) for i in data["indices"]),
                tuple(tuple(bytes.fromhex(h) for h in path) for path in data["paths"]),
            )
        except (KeyError, TypeError, ValueError, RecordError) as exc:
            raise InvalidStatement(f"earnings proof is malformed: {exc}") from exc


def verify_earnings(proof: EarningsProof, head: Record | dict[str, Any] | bytes | None = None) -> int:
    """Check an earnings proof and return the total it proves; raises InvalidStatement otherwise.

    Checks the statement's signature, that each move is signed by the same ledger, credits the
    account and is in the log at the statement's size, and that the amounts add up. With `head`
    (a signed tree head fetched from the log), also checks the statement names that very tree.
    """
    statement = verify_record(proof.statement.to_json(), EarningsStatementBody)
    body = statement.body
    if head is not None:
        signed = verify_tree_head(head.to_json() if isinstance(head, Record) else head)
        if signed.signer != statement.signer or (signed.body.size, signed.body.root) != (body.log_size, body.log_root):
            raise InvalidStatement("the statement names another tree than the log's signed head")
    if not len(proof.moves) == len(proof.indices) == len(proof.paths) == len(body.moves):
        raise InvalidStatement(f"statement lists {len(body.moves)} moves; the proof carries {len(proof.moves)}")
    total = 0
    root = bytes.fromhex(body.log_root)
    for data, index, path, cid in zip(proof.moves, proof.indices, proof.paths, body.moves):
        try:
            move = verify_record(data, CreditMoveBody)
        except RecordError as exc:
            raise InvalidStatement(f"credit move {cid} does not verify: {exc}") from exc
        if move.signer != statement.signer:
            raise InvalidStatement(f"credit move {cid} is signed by {move.signer}, not the ledger")
        if str(move.cid) != cid:
            raise InvalidStatement(f"credit move at log index {index} is not the {cid} the statement lists")
        if move.body.credit != body.account:
            raise InvalidStatement(f"credit move {cid} pays {move.body.credit}, not {body.account}")
        try:
            verify_inclusion(leaf_hash(cid_key(data)), index, body.log_size, list(path), root)
        except InvalidProof as exc:
            raise InvalidStatement(f"credit move {cid} is not in the log: {exc}") from exc
        total += move.body.amount
    if len(set(body.moves)) != len(body.moves):
        raise InvalidStatement("the statement lists a move twice")
    if total != body.total:
        raise InvalidStatement(f"moves add up to {total}, the statement says {body.total}")
    return total
