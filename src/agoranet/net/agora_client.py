"""A typed async client of one node's `/agora/v1` API (records, receipts, verification, reputation,
the transparency log, credits, offers), over httpx.

It runs on httpx, as the storage client and the CLI do; only the gateway's relay of user requests runs
on aiohttp (`net.peer`, where the measured reason is written).

Roles share one `httpx.AsyncClient` between the clients of many nodes (`AgoraClient(url, http=…)`);
the CLI opens one per command (`async with AgoraClient(url) as node`) or makes a single call from
sync code with `call(url, lambda node: node.reputation())`.

Failures come out as two errors: `NodeUnreachable` (no connection, timeout, an answer that is too
large or not what the route sends) and `NodeRefused` (an HTTP error status, with the server's own
message and code). Every answer is read with a byte cap, so a hostile node cannot exhaust memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json, to_json

from agoranet.core.errors import AgoraError, RecordError
from agoranet.core.records import OfferBody, Record, verify_record
from agoranet.log.records import TreeHeadBody, verify_tree_head
from agoranet.wire.agora import (
    API, CBOR, ConsistencyProof, FeedPage, InclusionProof, LogEntries, OfferAnswer, ProofCheck, ProofSubmission,
    ReputationTable, StatementAnswer, SubmitAnswer, VerifyAnswer, VerifyRequest,
)
from agoranet.wire.openai import read_error

__all__ = ["AgoraClient", "NodeError", "NodeRefused", "NodeUnreachable", "call", "MAX_ANSWER_BYTES", "NOT_JSON",
           "UNEXPECTED"]

MAX_ANSWER_BYTES = 16 << 20  # the default cap on one answer (a receipt with top-20 logprobs runs to megabytes)
NOT_JSON, UNEXPECTED = "not JSON", "unexpected answer"  # NodeUnreachable.reason for answers of the wrong form
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class NodeError(AgoraError):
    """A node could not be asked, or refused; `url` is the node's base URL."""

    def __init__(self, message: str, *, url: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.url = url


class NodeUnreachable(NodeError):
    """No usable answer: `reason` says why in a few words (the exception's name, 'not JSON', …)."""

    hint = "check the URL and that the node runs"

    def __init__(self, message: str, *, url: str, reason: str) -> None:
        super().__init__(message, url=url)
        self.reason = reason


class NodeRefused(NodeError):
    """The node answered an HTTP error: `status`, and its OpenAI-style error `message`, `code`, `param`."""

    def __init__(self, url: str, path: str, status: int, body: bytes) -> None:
        try:
            error = read_error(from_json(body))
        except ValueError:
            error = None
        self.status = status
        self.message = (error.message if error is not None else None) or body[:200].decode(errors="replace")
        self.code = error.code if error is not None else None
        self.param = error.param if error is not None else None
        super().__init__(f"{url}{API}{path} answered {status}: {self.message}", url=url)


class AgoraClient:
    """One node's `/agora/v1` API. `http` is shared (and closed by its owner); without it the client
    owns one, closed by `aclose()` or `async with`. `timeout` applies to each request."""

    def __init__(self, url: str, http: httpx.AsyncClient | None = None, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._own = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout)

    async def __aenter__(self) -> AgoraClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    # -- transport -------------------------------------------------------------------------------------

    def _unreachable(self, path: str, reason: str, detail: str = "") -> NodeUnreachable:
        return NodeUnreachable(f"cannot reach {self.url}{API}{path}: {detail or reason}", url=self.url, reason=reason)

    async def _send(self, method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None,
                    accept: str = "application/json", max_bytes: int = MAX_ANSWER_BYTES) -> bytes:
        """The answer's bytes (status 2xx) read up to `max_bytes`; NodeRefused on an error status."""
        headers = {"accept": accept}
        content = None
        if body is not None:
            content = to_json(body.model_dump() if isinstance(body, BaseModel) else body)
            headers["content-type"] = "application/json"
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            async with self._http.stream(method, f"{self.url}{API}{path}", params=query, content=content,
                                         headers=headers, timeout=self.timeout) as r:
                data = bytearray()
                async for piece in r.aiter_bytes():
                    data += piece
                    if len(data) > max_bytes:
                        raise self._unreachable(path, f"more than {max_bytes} bytes",
                                                f"it answered with more than {max_bytes} bytes")
                status = r.status_code
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # a user's URL may be anything
            name = type(exc).__name__
            raise self._unreachable(path, name, f"{name}: {exc}" if str(exc) else name) from None
        if status >= 400:
            raise NodeRefused(self.url, path, status, bytes(data))
        return bytes(data)

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        data = await self._send(method, path, **kwargs)
        try:
            return from_json(data)
        except ValueError:
            raise self._unreachable(path, NOT_JSON, "it did not answer JSON") from None

    async def _model(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        answer = await self._json(method, path, **kwargs)
        try:
            return model.model_validate(answer)
        except ValidationError as exc:
            raise self._unreachable(path, UNEXPECTED,
                                    f"its answer is not a {model.__name__}: {exc.errors()[0]['msg']}") from None

    async def _feed(self, path: str, key: str, after: int, limit: int) -> FeedPage:
        answer = await self._json("GET", path, params={"after": after, "limit": limit})
        try:
            return FeedPage.model_validate({"items": answer.get(key, []), "next": answer.get("next", after)})
        except (ValidationError, AttributeError):
            raise self._unreachable(path, UNEXPECTED, f"its answer is not a page of {key}") from None

    # -- records ---------------------------------------------------------------------------------------

    async def record_bytes(self, cid: str, *, max_bytes: int = MAX_ANSWER_BYTES) -> bytes:
        """A stored record's (or canonical request's) DAG-CBOR bytes, unchecked."""
        return await self._send("GET", f"/records/{cid}", accept=CBOR, max_bytes=max_bytes)

    async def record(self, cid: str) -> Record[Any]:
        """A stored signed record, checked: canonical bytes, known type, valid signature, the CID asked for."""
        record: Record[Any] = verify_record(await self.record_bytes(cid))
        if str(record.cid) != cid:
            raise RecordError(f"{self.url} returned a record whose CID is {record.cid}, not {cid}")
        return record

    async def offer(self, *, max_bytes: int = MAX_ANSWER_BYTES) -> OfferAnswer:
        """The provider's signed offer (unchecked: `verify_record(answer.record, OfferBody)`)."""
        return await self._model(OfferAnswer, "GET", "/offer", max_bytes=max_bytes)

    async def signed_offer(self) -> Record[OfferBody]:
        return verify_record((await self.offer()).record, OfferBody)

    async def receipts(self, after: int = 0, limit: int = 100) -> FeedPage:
        """The receipts a provider (or gateway) signed or relayed, oldest first; `next` is the cursor."""
        return await self._feed("/receipts", "receipts", after, limit)

    async def verdicts(self, after: int = 0, limit: int = 100) -> FeedPage:
        return await self._feed("/verdicts", "verdicts", after, limit)

    async def fraud_proofs(self, after: int = 0, limit: int = 100) -> FeedPage:
        return await self._feed("/fraud-proofs", "fraud_proofs", after, limit)

    # -- a verifier --------------------------------------------------------------------------------------

    async def verify(self, request: VerifyRequest) -> VerifyAnswer:
        """Have the verifier replay one receipt now and sign its verdict."""
        return await self._model(VerifyAnswer, "POST", "/verify", body=request)

    async def submit_receipt(self, request: VerifyRequest) -> SubmitAnswer:
        """Hand the verifier a receipt it audits with its audit fraction."""
        return await self._model(SubmitAnswer, "POST", "/receipts", body=request)

    async def submit_fraud_proof(self, record: dict[str, Any]) -> ProofCheck:
        return await self._model(ProofCheck, "POST", "/fraud-proofs", body=ProofSubmission(record=record))

    async def reputation(self) -> ReputationTable:
        return await self._model(ReputationTable, "GET", "/reputation")

    # -- the transparency log ----------------------------------------------------------------------------

    async def log_head(self, size: int | None = None) -> Record[TreeHeadBody]:
        """The log's signed tree head (now, or at an earlier `size`), its signature checked."""
        return verify_tree_head(await self._json("GET", "/log/head", params={"size": size}))

    async def inclusion_proof(self, cid: str, size: int | None = None) -> InclusionProof:
        return await self._model(InclusionProof, "GET", "/log/proof/inclusion", params={"cid": cid, "size": size})

    async def consistency_proof(self, first: int, second: int | None = None) -> ConsistencyProof:
        return await self._model(ConsistencyProof, "GET", "/log/proof/consistency",
                                 params={"first": first, "second": second})

    async def log_entries(self, start: int, end: int | None = None) -> LogEntries:
        return await self._model(LogEntries, "GET", "/log/entries", params={"start": start, "end": end})

    async def split_views(self, log_id: str | None = None) -> dict[str, Any]:
        """A witness's split-view proofs (each re-checkable with `log.records.SplitViewProof.from_json`)."""
        return await self._json("GET", "/log/split-views", params={"log_id": log_id})

    async def witnessed_heads(self) -> dict[str, Any]:
        return await self._json("GET", "/log/heads")

    # -- a gateway and any node ---------------------------------------------------------------------------

    async def credit_statement(self, peer_id: str) -> StatementAnswer:
        """A provider's signed earnings statement with inclusion proofs, and the head it names."""
        return await self._model(StatementAnswer, "GET", f"/credits/statement/{peer_id}")

    async def providers(self) -> dict[str, Any]:
        return await self._json("GET", "/providers")

    async def status(self, *, peers: bool = True) -> dict[str, Any]:
        """The node's status document (the dashboard's data); `peers=False` leaves out the peers it sees."""
        answer = await self._json("GET", "/status", params={"peers": None if peers else "false"})
        if not isinstance(answer, dict):
            raise self._unreachable("/status", UNEXPECTED, "its status is not a JSON object")
        return answer


def call(url: str, fn: Callable[[AgoraClient], Awaitable[T]], *, timeout: float = 30.0) -> T:
    """One call from sync code (the CLI): `call(url, lambda node: node.reputation())`."""
    async def run() -> T:
        async with AgoraClient(url, timeout=timeout) as node:
            return await fn(node)
    return asyncio.run(run())
