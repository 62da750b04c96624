from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agoranet.core.identity import Identity
from agoranet.core.records import sign_record, verify_record
from agoranet.log.credits import (
    ISSUANCE, OPERATOR, CreditLedger, EarningsProof, provider, replay_balances, user, verifier, verify_earnings,
)
from agoranet.log.errors import (
    EscrowError, InsufficientCredits, InvalidAmount, InvalidStatement, UnknownAccount,
)
from agoranet.log.records import CreditMoveBody
from agoranet.log.transparency import TransparencyLog

KEY = Identity.generate()
PROVIDER = provider("12D3KooWProvider")
VERIFIER = verifier("12D3KooWVerifier")


@pytest.fixture
def ledger(tmp_path: Path, identity: Identity) -> CreditLedger:
    with TransparencyLog(tmp_path / "log.db", identity) as tlog:
        yield CreditLedger(tlog)


def test_a_request_holds_the_max_price_and_settles_on_the_real_cost(ledger: CreditLedger) -> None:
    ledger.mint(1_000)
    ledger.fund(user("ann"), 600)
    ledger.hold("req-1", user("ann"), 250)
    assert ledger.balance(user("ann")) == 350 and ledger.balance("escrow:req-1") == 250
    moves = ledger.settle("req-1", PROVIDER, 120, verifier_account=VERIFIER, verifier_fee=10)
    assert [(m.body.kind, m.body.credit, m.body.amount) for m in moves] == [
        ("settle", PROVIDER, 120), ("settle", VERIFIER, 10), ("refund", user("ann"), 120),
    ]
    assert ledger.balances() == {
        ISSUANCE: -1_000, OPERATOR: 400, PROVIDER: 120, user("ann"): 470, VERIFIER: 10,
    }
    assert ledger.escrow("req-1") == (user("ann"), 250, True)
    assert ledger.replay() == ledger.balances()


def test_every_move_is_a_signed_record_in_the_log(ledger: CreditLedger, identity: Identity) -> None:
    ledger.mint(50)
    ledger.fund(user("bo"), 20)
    entries = ledger.log.entries(0, 10)
    assert len(entries) == 2
    moves = [verify_record(e.record, CreditMoveBody) for e in entries]
    assert [(m.body.kind, m.body.seq, m.body.amount) for m in moves] == [("mint", 0, 50), ("fund", 1, 20)]
    assert all(m.signer == str(identity.peer_id) for m in moves)


def test_overspending_is_refused_with_a_clear_error_and_changes_nothing(ledger: CreditLedger) -> None:
    ledger.mint(100)
    ledger.fund(user("cy"), 30)
    before, size = ledger.balances(), ledger.log.size
    with pytest.raises(InsufficientCredits, match="user:cy has 30 micro-credits, 31 needed"):
        ledger.hold("req", user("cy"), 31)
    with pytest.raises(InsufficientCredits, match="operator has 70"):
        ledger.fund(user("dee"), 71)
    assert ledger.balances() == before and ledger.log.size == size
    assert ledger.escrow("req") is None


def test_escrows_are_settled_once_and_for_at_most_what_they_hold(ledger: CreditLedger) -> None:
    ledger.mint(100)
    ledger.fund(user("ed"), 100)
    ledger.hold("r", user("ed"), 40)
    with pytest.raises(EscrowError, match="already has an escrow"):
        ledger.hold("r", user("ed"), 10)
    with pytest.raises(EscrowError, match="more than the 40 held"):
        ledger.settle("r", PROVIDER, 35, verifier_account=VERIFIER, verifier_fee=6)
    ledger.settle("r", PROVIDER, 40)
    with pytest.raises(EscrowError, match="already settled"):
        ledger.settle("r", PROVIDER, 1)
    with pytest.raises(EscrowError, match="no escrow"):
        ledger.settle("nope", PROVIDER, 1)


def test_bad_amounts_and_account_names_are_refused(ledger: CreditLedger) -> None:
    for amount in (0, -5, 1.5, True):
        with pytest.raises(InvalidAmount):
            ledger.mint(amount)  # type: ignore[arg-type]
    with pytest.raises(UnknownAccount):
        ledger.fund("bank:x", 1)
    with pytest.raises(UnknownAccount):
        ledger.fund(PROVIDER, 1)
    with pytest.raises(UnknownAccount):
        ledger.balance("user:")


def test_a_provider_proves_its_earnings_against_the_signed_head(ledger: CreditLedger) -> None:
    ledger.mint(10_000)
    for i in range(5):
        ledger.fund(user(f"u{i}"), 1_000)
        ledger.hold(f"q{i}", user(f"u{i}"), 500)
        ledger.settle(f"q{i}", PROVIDER, 100 + i, verifier_account=VERIFIER, verifier_fee=7)
    proof = EarningsProof.from_json(ledger.earnings_proof(PROVIDER).to_json())
    head = ledger.log.head()
    assert verify_earnings(proof, head.to_json()) == sum(100 + i for i in range(5)) == proof.statement.body.total
    assert verify_earnings(ledger.earnings_proof(VERIFIER)) == 35

    ledger.fund(user("late"), 1)  # the log moves on: an old statement no longer names the head
    with pytest.raises(InvalidStatement, match="another tree"):
        verify_earnings(proof, ledger.log.head())


def test_a_doctored_earnings_proof_is_rejected(ledger: CreditLedger, identity: Identity) -> None:
    ledger.mint(1_000)
    ledger.fund(user("a"), 1_000)
    for i in range(3):
        ledger.hold(f"q{i}", user("a"), 100)
        ledger.settle(f"q{i}", PROVIDER, 50)
    good = ledger.earnings_proof(PROVIDER)
    verify_earnings(good)

    # a move forged by someone else, re-signed statement and all, does not verify against the log
    other = Identity.generate()
    forged = sign_record(identity, CreditMoveBody(
        seq=99, kind="settle", debit="escrow:x", credit=PROVIDER, amount=10**6, timestamp_ms=0,
    )).encode()
    bad = EarningsProof(good.statement, (forged, *good.moves[1:]), good.indices, good.paths)
    with pytest.raises(InvalidStatement, match="not the .* the statement lists"):
        verify_earnings(bad)
    statement = sign_record(identity, good.statement.body.model_copy(update={"total": 10**6}))
    with pytest.raises(InvalidStatement, match="add up to 150"):
        verify_earnings(EarningsProof(statement, good.moves, good.indices, good.paths))
    moved = EarningsProof(good.statement, good.moves, (good.indices[1], *good.indices[1:]), good.paths)
    with pytest.raises(InvalidStatement, match="not in the log"):
        verify_earnings(moved)
    stolen = sign_record(other, good.statement.body)
    with pytest.raises(InvalidStatement, match="not the ledger"):
        verify_earnings(EarningsProof(stolen, good.moves, good.indices, good.paths))


def test_replay_catches_an_overdraft_hidden_in_the_log(identity: Identity) -> None:
    moves = [
        sign_record(identity, CreditMoveBody(seq=0, kind="mint", debit=ISSUANCE, credit=OPERATOR, amount=5,
                                             timestamp_ms=0)).encode(),
        sign_record(identity, CreditMoveBody(seq=1, kind="fund", debit=OPERATOR, credit=user("x"), amount=6,
                                             timestamp_ms=0)).encode(),
    ]
    with pytest.raises(InvalidStatement, match="overdraws operator"):
        replay_balances(moves)
    with pytest.raises(InvalidStatement, match="move 1 found where 0"):
        replay_balances(moves[1:])


# -- properties: whatever happens, balances stay ≥ 0, the total stays 0, the log agrees ------------

USERS = [user(n) for n in ("ann", "bo", "cy")]
amounts = st.integers(min_value=1, max_value=2_000)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.log = TransparencyLog(":memory:", KEY)
        self.ledger = CreditLedger(self.log)
        self.open: list[str] = []
        self.requests = 0

    def teardown(self) -> None:
        self.log.close()

    def attempt(self, action) -> None:
        """Run a move; if refused, it must have changed neither balances nor the log."""
        before, size = self.ledger.balances(), self.log.size
        try:
            action()
        except (InsufficientCredits, EscrowError, InvalidAmount):
            assert self.ledger.balances() == before and self.log.size == size

    @rule(amount=amounts)
    def mint(self, amount: int) -> None:
        self.ledger.mint(amount)

    @rule(who=st.sampled_from(USERS), amount=amounts)
    def fund(self, who: str, amount: int) -> None:
        self.attempt(lambda: self.ledger.fund(who, amount))

    @rule(who=st.sampled_from(USERS), amount=amounts)
    def hold(self, who: str, amount: int) -> None:
        rid = f"r{self.requests}"
        self.requests += 1

        def go() -> None:
            self.ledger.hold(rid, who, amount)
            self.open.append(rid)

        self.attempt(go)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), cost=st.integers(0, 2_500), fee=st.integers(0, 300))
    def settle(self, data: st.DataObject, cost: int, fee: int) -> None:
        rid = data.draw(st.sampled_from(self.open))
        held = self.ledger.escrow(rid)[1]

        def go() -> None:
            self.ledger.settle(rid, PROVIDER, cost, verifier_account=VERIFIER, verifier_fee=fee)
            self.open.remove(rid)

        self.attempt(go)
        if cost + fee <= held:
            assert rid not in self.open

    @precondition(lambda self: self.open)
    @rule(data=st.data(), costs=st.lists(st.integers(0, 1_200), max_size=3))
    def settle_many(self, data: st.DataObject, costs: list[int]) -> None:
        """A failover pays several providers from one escrow; no payment at all refunds it whole."""
        rid = data.draw(st.sampled_from(self.open))
        held = self.ledger.escrow(rid)[1]
        payees = [provider(f"12D3KooWP{i}") for i in range(len(costs))]

        def go() -> None:
            self.ledger.settle_many(rid, list(zip(payees, costs)))
            self.open.remove(rid)

        self.attempt(go)
        assert (rid in self.open) == (sum(costs) > held)

    @invariant()
    def balances_never_negative_and_total_conserved(self) -> None:
        balances = self.ledger.balances()
        assert all(v >= 0 for k, v in balances.items() if k != ISSUANCE)
        assert sum(balances.values()) == 0

    @invariant()
    def escrow_accounts_hold_exactly_the_open_requests(self) -> None:
        balances = self.ledger.balances()
        held = sum(v for k, v in balances.items() if k.startswith("escrow:"))
        assert held == sum(self.ledger.escrow(r)[1] for r in self.open)

    @invariant()
    def the_log_replays_to_the_same_balances(self) -> None:
        # As functions of the account (absent = 0): an account emptied to 0 may or may not be listed.
        nonzero = lambda balances: {k: v for k, v in balances.items() if v}  # noqa: E731
        assert nonzero(self.ledger.replay()) == nonzero(self.ledger.balances())


TestLedgerProperties = LedgerMachine.TestCase
TestLedgerProperties.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
