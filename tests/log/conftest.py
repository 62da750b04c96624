from __future__ import annotations

from pathlib import Path

import pytest

from agoranet.core.identity import Identity
from agoranet.core.records import sign_record
from agoranet.log.records import CreditMoveBody
from agoranet.log.transparency import TransparencyLog


@pytest.fixture(scope="session")
def identity() -> Identity:
    return Identity.generate()


@pytest.fixture
def tlog(tmp_path: Path, identity: Identity) -> TransparencyLog:
    with TransparencyLog(tmp_path / "log.db", identity) as opened:
        yield opened


def make_records(identity: Identity, n: int, tag: str = "r") -> list[bytes]:
    """Distinct small signed records (the log does not care which type; these are cheap to make)."""
    return [
        sign_record(identity, CreditMoveBody(
            seq=i, kind="fund", debit="operator", credit=f"user:{tag}", amount=i + 1, timestamp_ms=i,
        )).encode()
        for i in range(n)
    ]
