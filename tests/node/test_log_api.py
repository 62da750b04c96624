"""The log's HTTP endpoints, served by a real uvicorn on loopback and read with httpx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from agoranet.core.cid import DAG_CBOR, cid_of
from agoranet.core.identity import Identity
from agoranet.core.records import sign_record
from agoranet.log.merkle import leaf_hash, verify_consistency, verify_inclusion
from agoranet.log.records import CreditMoveBody, verify_tree_head
from agoranet.log.transparency import MAX_PAGE, TransparencyLog
from agoranet.node.log_api import log_router
from agoranet.node.server import BackgroundServer


def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` on a free loopback port in a thread; yield its base URL; stop it afterwards."""
    with BackgroundServer(app) as server:
        yield server.url


RECORDS_N = MAX_PAGE + 30


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TransparencyLog, list[bytes]]]:
    identity = Identity.generate()
    records = [
        sign_record(identity, CreditMoveBody(seq=i, kind="fund", debit="operator", credit="user:a", amount=1 + i,
                                             timestamp_ms=0)).encode()
        for i in range(RECORDS_N)
    ]
    tlog = TransparencyLog(Path(tmp_path_factory.mktemp("api")) / "log.db", identity)
    tlog.append_many(records)
    app = FastAPI()
    app.include_router(log_router(tlog))
    for url in serve(app):
        yield url, tlog, records
    tlog.close()


def test_head_is_signed_by_the_log(served) -> None:
    url, tlog, _ = served
    head = verify_tree_head(httpx.get(f"{url}/agora/v1/log/head").json())
    assert head.body.size == RECORDS_N and head.body.root_hash == tlog.root()
    old = verify_tree_head(httpx.get(f"{url}/agora/v1/log/head", params={"size": 10}).json())
    assert old.body.size == 10 and old.body.root_hash == tlog.root(10)


def test_inclusion_proof_verifies_against_the_head(served) -> None:
    url, _, records = served
    head = verify_tree_head(httpx.get(f"{url}/agora/v1/log/head").json()).body
    for i in (0, 517, RECORDS_N - 1):
        cid = cid_of(records[i], DAG_CBOR)
        got = httpx.get(f"{url}/agora/v1/log/proof/inclusion", params={"cid": str(cid), "size": head.size}).json()
        assert got["index"] == i
        verify_inclusion(leaf_hash(bytes(cid)), i, head.size, [bytes.fromhex(h) for h in got["proof"]], head.root_hash)


def test_consistency_proof_joins_an_old_head_to_the_new(served) -> None:
    url, tlog, _ = served
    got = httpx.get(f"{url}/agora/v1/log/proof/consistency", params={"first": 33, "second": RECORDS_N}).json()
    verify_consistency(33, RECORDS_N, tlog.root(33), tlog.root(), [bytes.fromhex(h) for h in got["proof"]])


def test_entries_come_in_bounded_pages_with_their_exact_bytes(served) -> None:
    url, _, records = served
    page = httpx.get(f"{url}/agora/v1/log/entries", params={"start": 0, "end": 10**6}).json()
    assert page["end"] == MAX_PAGE and len(page["entries"]) == MAX_PAGE and page["size"] == RECORDS_N
    rest = httpx.get(f"{url}/agora/v1/log/entries", params={"start": MAX_PAGE}).json()
    got = [bytes.fromhex(e["record"]) for e in page["entries"] + rest["entries"]]
    assert got == records
    assert rest["entries"][0]["cid"] == str(cid_of(records[MAX_PAGE], DAG_CBOR))


@pytest.mark.parametrize(("path", "params", "status", "param", "code"), [
    ("/proof/inclusion", {}, 400, "cid", "invalid_parameter"),
    ("/proof/inclusion", {"cid": "nonsense"}, 400, "cid", "invalid_cid"),
    ("/proof/inclusion", {"cid": str(cid_of(b"absent", DAG_CBOR))}, 404, "cid", "not_found"),
    ("/proof/inclusion", {"cid": "CID", "size": "-1"}, 400, "size", "invalid_parameter"),
    ("/proof/inclusion", {"cid": "CID", "size": "3"}, 400, "size", "beyond_log_size"),
    ("/proof/consistency", {"first": "x", "second": "3"}, 400, "first", "invalid_parameter"),
    ("/proof/consistency", {"first": "5", "second": "3"}, 400, "first", "invalid_parameter"),
    ("/proof/consistency", {"first": "5", "second": str(10**6)}, 400, "second", "beyond_log_size"),
    ("/entries", {}, 400, "start", "invalid_parameter"),
    ("/entries", {"start": "9", "end": "2"}, 400, "end", "invalid_parameter"),
    ("/entries", {"start": str(10**6)}, 400, "start", "invalid_parameter"),
    ("/head", {"size": str(10**6)}, 400, "size", "beyond_log_size"),
])
def test_bad_parameters_get_openai_style_errors(served, path, params, status, param, code) -> None:
    url, _, records = served
    if params.get("cid") == "CID":
        params = {**params, "cid": str(cid_of(records[RECORDS_N - 1], DAG_CBOR))}
    response = httpx.get(f"{url}/agora/v1/log{path}", params=params)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert error["message"]
