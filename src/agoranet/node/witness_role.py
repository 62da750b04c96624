"""Witness role: gossips this node's signed tree head and checks every other log's heads it hears of.

Heads travel by gossip as their own record kind. A head of the same size as the one held must have
the same root; a head of another size is checked with a consistency proof fetched from the log's
node (its URL is the one its signed heartbeat gives). When the proof fails, the node is also asked
to sign its head at the disputed size: a root that differs from the one it signed before turns the
report into a conclusive split view (two roots for one size, both signed by the log). Split views
are kept, served at `GET /agora/v1/log/split-views`, and the log is untrusted from then on; a
gateway stops routing to its provider.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
from fastapi import APIRouter

from agoranet.core.errors import RecordError
from agoranet.core.records import Record, sign_record
from agoranet.core.tasks import cancel_and_wait
from agoranet.log.errors import InvalidTreeHead
from agoranet.log.records import SplitViewProof, SplitViewsBody, TreeHeadBody
from agoranet.log.transparency import TransparencyLog
from agoranet.log.witness import Witness
from agoranet.net.agora_client import AgoraClient, NodeError, NodeRefused
from agoranet.net.gossip import GossipDiscovery, GossipKind

log = logging.getLogger(__name__)

HEAD_TTL_S = 600.0  # a gossiped head is relayed this long after it was signed
MAX_PENDING = 256  # heads waiting for a consistency proof; more are dropped (the log re-signs anyway)
REPORT_TTL_S = 3600.0  # a gossiped split-view report is relayed this long after it was signed
MAX_REPORTED = 16  # conclusive proofs in one report: the newest (a report with more is refused)


def _report_problem(record: Record[Any]) -> str | None:
    """Why a gossiped split-view report is refused (a short code, counted by gossip): too many proofs,
    or one that is not a conclusive fork once re-checked here."""
    proofs = record.body.proofs
    if len(proofs) > MAX_REPORTED:
        return "too_many_split_views"
    for data in proofs:
        try:
            split = SplitViewProof.from_json(data)
        except (InvalidTreeHead, RecordError, KeyError, TypeError, ValueError) as exc:
            log.info("a split-view report from %s does not re-check: %s", record.signer, exc)
            return "bad_split_view"
        if not split.conclusive:
            return "inconclusive_split_view"
    return None


def _signed_by_its_log(record: Record[Any]) -> str | None:
    return None if record.body.log_id == record.signer else "wrong_signer"


class WitnessRole:
    """Keeps the latest verified head of every log gossip brings, and the split views between them."""

    role_name = "witness"

    def __init__(self, witness: Witness, discovery: GossipDiscovery, own_log: TransparencyLog | None = None, *,
                 head_ttl_s: float = HEAD_TTL_S, timeout_s: float = 5.0) -> None:
        self.witness, self.discovery, self.own_log = witness, discovery, own_log
        self.head_ttl_s = head_ttl_s
        self.timeout_s = timeout_s
        self.router = self._routes()
        self.heads_seen = 0
        self.consistency_checks = 0
        self.check_failures = 0  # the log's node could not be asked (unknown URL, down, garbled answer)
        self.split_views_found = 0
        self._own: Record[TreeHeadBody] | None = None
        self._pending: dict[str, Record[TreeHeadBody]] = {}  # head CID -> head awaiting a proof
        self._wake = asyncio.Event()
        self._http: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        discovery.add_kind(GossipKind(TreeHeadBody, issued_ms=lambda body: body.timestamp_ms, ttl_s=head_ttl_s,
                                      own=self.own_head if own_log is not None else None,
                                      problem=_signed_by_its_log, observe=self.observe))
        # The proofs themselves travel too, so a node that only ever saw one of a log's views learns of
        # the fork from any witness that caught it (and re-checks the proof: it trusts no witness).
        self._reports: Record[SplitViewsBody] | None = None
        self._reported = 0  # split views this node held when it last signed its report
        self.reports_adopted = 0  # split views learnt from other witnesses' reports
        discovery.add_kind(GossipKind(SplitViewsBody, issued_ms=lambda body: body.issued_ms, ttl_s=REPORT_TTL_S,
                                      own=self.own_reports, problem=_report_problem, observe=self.observe_reports))

    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=self.timeout_s)
        self._task = asyncio.create_task(self._check_pending(), name="agora-witness")  # owned: cancelled in stop()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._http is not None:
            await self._http.aclose()
        self.witness.close()

    def untrusted(self, peer: str) -> bool:
        """Whether the log of this peer (its log id is its peer id) was caught in a split view."""
        return self.witness.untrusted(peer)

    # -- gossip ---------------------------------------------------------------------------------------

    def own_head(self) -> Record[TreeHeadBody] | None:
        """This node's signed head, re-signed when the log grew or a quarter of its gossip lifetime passed."""
        assert self.own_log is not None
        held = self._own
        age_ms = int(time.time() * 1000) - held.body.timestamp_ms if held is not None else 0
        if held is None or held.body.size != self.own_log.size or age_ms > self.head_ttl_s * 250:
            self._own = self.own_log.head()
        return self._own

    def own_reports(self) -> Record[SplitViewsBody] | None:
        """This node's report of the conclusive split views it holds (None while it holds none),
        re-signed when it learns of another or a quarter of the report's gossip lifetime passed."""
        count = self.witness.split_view_count()
        held = self._reports
        age_ms = int(time.time() * 1000) - held.body.issued_ms if held is not None else 0
        if count != self._reported or (held is not None and age_ms > REPORT_TTL_S * 250):
            proofs = [v.proof.to_json() for v in self.witness.split_views() if v.proof.conclusive][-MAX_REPORTED:]
            self._reports = sign_record(self.discovery.identity, SplitViewsBody(
                proofs=proofs, issued_ms=int(time.time() * 1000))) if proofs else None
            self._reported = count
        return self._reports

    def observe_reports(self, report: Record[SplitViewsBody]) -> None:
        """Keep every proof of another witness's report (each re-checked, as `_report_problem` did)."""
        for data in report.body.proofs:
            split = SplitViewProof.from_json(data)
            if not self.witness.untrusted(split.first.body.log_id):
                self.reports_adopted += 1
                self._found(split)

    def observe(self, head: Record[TreeHeadBody]) -> None:
        """A new verified head from gossip: judge it now if no proof is needed, else queue it."""
        self.heads_seen += 1
        log_id = head.body.log_id
        if self.witness.untrusted(log_id):
            return  # already caught; its further heads prove nothing new
        if self.own_log is not None and log_id == self.own_log.log_id:
            if (split := self.own_log.check_head(head)) is not None:  # someone signs heads with our key
                self._found(split)
            return
        if self.witness.needs_proof(head) is None:
            if (split := self.witness.judge(head)) is not None:
                self._found(split)
            return
        if len(self._pending) < MAX_PENDING:
            self._pending[str(head.cid)] = head
            self._wake.set()

    async def _check_pending(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                cid = next(iter(self._pending))
                head = self._pending.pop(cid)
                try:
                    await self.check(head)
                except Exception:  # one bad head must not stop the witness
                    log.exception("checking head %s failed", cid)

    async def check(self, head: Record[TreeHeadBody]) -> SplitViewProof | None:
        """Judge a head against the held one, fetching the consistency proof from the log's node."""
        log_id = head.body.log_id
        if self.witness.untrusted(log_id):
            return None
        if (sizes := self.witness.needs_proof(head)) is None:
            split = self.witness.judge(head)
        else:
            url = await self.discovery.locate(log_id)
            proof = await self._consistency(url, *sizes) if url is not None else None
            if proof is None:
                self.check_failures += 1
                log.info("could not check head %s of log %s: its node did not give a consistency proof",
                         head.cid, log_id)
                return None
            if self.witness.needs_proof(head) != sizes:  # the held head moved while we asked: ask again
                self._pending.setdefault(str(head.cid), head)
                return None
            self.consistency_checks += 1
            split = self.witness.judge(head, proof)
            if split is not None and not split.conclusive and (strong := await self._conclusive(url, split)):
                self._found(strong)
                # the log's own failed proof stays on record beside the stronger evidence
        if split is not None:
            self._found(split)
        return split

    def _found(self, split: SplitViewProof) -> None:
        try:
            new = self.witness.record(split)
        except InvalidTreeHead as exc:  # e.g. a head claiming entries beyond an empty log: no evidence
            log.info("a report against log %s does not re-check; not kept: %s", split.first.body.log_id, exc)
            return
        if new:
            self.split_views_found += 1
            log.warning("split view: log %s signed heads of sizes %d and %d that cannot both hold (%s); "
                        "the log is untrusted", split.first.body.log_id, split.first.body.size,
                        split.second.body.size, split.reason)

    def _node(self, url: str) -> AgoraClient:
        assert self._http is not None
        return AgoraClient(url, self._http, timeout=self.timeout_s)

    async def _consistency(self, url: str, first: int, second: int) -> list[bytes] | None:
        """The log's consistency proof; [] when the log says it cannot give one for its own head."""
        try:
            return (await self._node(url).consistency_proof(first, second)).hashes()
        except NodeRefused as exc:  # beyond_log_size: it signed a head of `second` entries but no longer has them
            return [] if exc.status == 400 and exc.code == "beyond_log_size" else None
        except (NodeError, ValueError):
            return None

    async def _conclusive(self, url: str, split: SplitViewProof) -> SplitViewProof | None:
        """Ask the log to sign its head at each disputed size; another root there proves the fork outright."""
        for claimed in (split.first, split.second):
            try:
                now = await self._node(url).log_head(claimed.body.size)
            except (NodeError, InvalidTreeHead):
                continue
            if now.body.log_id == claimed.body.log_id and now.body.size == claimed.body.size \
                    and now.body.root != claimed.body.root:
                return SplitViewProof(claimed, now, (), f"the log signed two roots for size {claimed.body.size}")
        return None

    # -- views ----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        heads = self.witness.heads()
        rows = [{"log_id": log_id, "size": h.body.size, "root": h.body.root, "timestamp_ms": h.body.timestamp_ms,
                 "trusted": not self.witness.untrusted(log_id)} for log_id, h in heads.items()]
        return {"witness": {"logs": len(heads), "untrusted": self.witness.untrusted_logs(),
                            "split_views": len(self.witness.split_views()), "heads": rows}}

    def metrics(self) -> dict[str, float]:
        return {"witness_logs": len(self.witness.heads()), "witness_untrusted_logs": len(self.witness.untrusted_logs()),
                "witness_heads_seen_total": self.heads_seen, "witness_consistency_checks_total": self.consistency_checks,
                "witness_check_failures_total": self.check_failures,
                "witness_split_views_total": self.split_views_found,
                "witness_split_views_adopted_total": self.reports_adopted}

    def _routes(self) -> APIRouter:
        r = APIRouter(tags=["log"])

        @r.get("/agora/v1/log/split-views")
        def split_views(log_id: str | None = None) -> dict[str, Any]:
            """Every split-view proof this node holds (each re-checkable on its own), and the untrusted logs."""
            return {"untrusted": self.witness.untrusted_logs(),
                    "split_views": [s.to_json() for s in self.witness.split_views(log_id)]}

        @r.get("/agora/v1/log/heads")
        def heads() -> dict[str, Any]:
            """The latest verified head of every log this node has heard of by gossip."""
            return {"heads": {log_id: {"record": h.to_json(), "trusted": not self.witness.untrusted(log_id)}
                              for log_id, h in self.witness.heads().items()}}

        return r
