"""`agora log …`: check a node's transparency log from the outside, trusting nothing it says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import typer

from agoranet.cli.console import CHECK_FAILED, console, fail
from agoranet.core.cid import parse_cid
from agoranet.core.errors import AgoraError, RecordError, UnknownRecordType
from agoranet.core.records import Record, decode_canonical, verify_record
from agoranet.log.credits import replay_balances
from agoranet.log.errors import InvalidStatement, InvalidTreeHead
from agoranet.log.merkle import MerkleTree, leaf_hash
from agoranet.log.records import TreeHeadBody, check_heads, verify_tree_head
from agoranet.log.transparency import check_inclusion, cid_key, key_cid
from agoranet.net.agora_client import AgoraClient, NodeError

__all__ = ["log_app"]

log_app = typer.Typer(
    help="Check a node's transparency log: its signed head, inclusion and consistency proofs, a full audit.",
    no_args_is_help=True,
)
SHOWN_PROBLEMS = 20


class _Unreadable(AgoraError):
    """A saved head file that cannot be read: exit 2, like a node that cannot be asked."""


def _run(url: str, body: Callable[[AgoraClient], Awaitable[None]]) -> None:
    """Run a check against the node at `url`; map the ways it can end to one line and an exit status."""
    async def run() -> None:
        async with AgoraClient(url) as client:
            await body(client)
    try:
        asyncio.run(run())
    except (NodeError, _Unreadable) as exc:
        raise fail(exc)
    except InvalidTreeHead as exc:
        raise fail(f"forged or malformed tree head: {exc}", CHECK_FAILED)
    except AgoraError as exc:
        raise fail(str(exc))


def _load_head(path: Path) -> Record[TreeHeadBody]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _Unreadable(f"cannot read a saved head from {path}: {exc}") from exc
    return verify_tree_head(data)


def _show_head(head: Record[TreeHeadBody]) -> None:
    b = head.body
    console.print(f"log   {b.log_id}\nsize  {b.size}\nroot  {b.root}\ntime  {b.timestamp_ms} ms")


@log_app.command()
def head(
    url: str = typer.Argument(..., help="node base URL, e.g. http://127.0.0.1:8000"),
    size: int | None = typer.Option(None, help="ask for the signed head of an earlier size"),
    save: Path | None = typer.Option(None, help="write the signed head as JSON, to check later heads against"),
) -> None:
    """Fetch the log's signed tree head and check its signature."""
    async def body(client: AgoraClient) -> None:
        signed = await client.log_head(size)
        _show_head(signed)
        if save is not None:
            save.write_text(json.dumps(signed.to_json(), indent=1))
            console.print(f"saved to {save}")
        console.print("[green]✓[/] signature valid")
    _run(url, body)


@log_app.command("verify-inclusion")
def verify_inclusion_cmd(
    url: str = typer.Argument(..., help="node base URL"),
    cid: str = typer.Argument(..., help="CID of the record (receipt, verdict, credit move …)"),
) -> None:
    """Prove a record is in the log, against the log's current signed head."""
    async def body(client: AgoraClient) -> None:
        signed = await client.log_head()
        got = await client.inclusion_proof(cid, signed.body.size)
        index = check_inclusion(signed, cid, got.model_dump())
        console.print(
            f"[green]✓[/] {cid} is entry {index} of {signed.body.size} in log {signed.body.log_id} "
            f"(root {signed.body.root[:16]}…, {len(got.proof)} hashes)"
        )
    _run(url, body)


async def _resolve(client: AgoraClient, which: str) -> Record[TreeHeadBody]:
    """A size asks the log for its signed head at that size; anything else is a saved head file."""
    return await client.log_head(int(which)) if which.isdigit() else _load_head(Path(which))


@log_app.command("verify-consistency")
def verify_consistency_cmd(
    url: str = typer.Argument(..., help="node base URL"),
    first: str = typer.Argument(..., help="older tree: a size, or a head saved with `agora log head --save`"),
    second: str = typer.Argument(..., help="newer tree: a size, or a saved head"),
) -> None:
    """Prove the log only appended between two heads (no history was rewritten)."""
    async def body(client: AgoraClient) -> None:
        a, b = await _resolve(client, first), await _resolve(client, second)
        small, large = sorted((a, b), key=lambda h: h.body.size)
        got = await client.consistency_proof(small.body.size, large.body.size)
        split = check_heads(small, large, got.hashes())
        if split is not None:
            raise fail(f"fork: log {small.body.log_id} signed inconsistent heads at sizes {small.body.size} and "
                       f"{large.body.size} ({split.reason}); keep both heads as evidence and stop trusting this log",
                       CHECK_FAILED)
        console.print(f"[green]✓[/] log {small.body.log_id}: size {large.body.size} extends size {small.body.size}")
    _run(url, body)


@log_app.command()
def audit(
    url: str = typer.Argument(..., help="node base URL"),
    known_head: list[Path] = typer.Option([], "--known-head", help="a head saved earlier; checks for a fork"),
) -> None:
    """Download every entry, recompute the root, check every record's signature and earlier heads."""
    async def body(client: AgoraClient) -> None:
        problems: list[str] = []
        unknown_types: dict[str, int] = {}
        tree = MerkleTree()
        records: list[bytes] = []
        signed = await client.log_head()
        size = signed.body.size
        with console.status(f"downloading {size} entries…"):
            while tree.size < size:
                entries = (await client.log_entries(tree.size, size)).entries
                if not entries:
                    problems.append(f"the log stops at {tree.size} entries but its head claims {size}")
                    break
                for entry in entries:
                    index = tree.size
                    _check_entry(entry, index, problems, unknown_types, records)
                    try:
                        tree.append(leaf_hash(bytes(parse_cid(entry["cid"]))))
                    except (AgoraError, KeyError, TypeError):
                        tree.append(leaf_hash(b""))  # already reported; keeps later indices aligned
        if tree.size == size and tree.root() != signed.body.root_hash:
            problems.append(
                f"forged head or altered entries: the root of the {size} entries served is "
                f"{tree.root().hex()[:16]}…, the signed head says {signed.body.root[:16]}…"
            )
        for path in known_head:
            await _check_known_head(client, path, signed, tree, problems)
        try:
            balances = replay_balances(records, ledger_id=signed.body.log_id)
        except (InvalidStatement, RecordError) as exc:
            problems.append(f"credit ledger does not add up: {exc}")
            balances = {}
        for type_name, count in sorted(unknown_types.items()):
            console.print(f"[yellow]note:[/] {count} entries of type {type_name} this agora cannot check")
        for line in problems[:SHOWN_PROBLEMS]:
            console.print(f"[red]✗[/] {line}")
        if len(problems) > SHOWN_PROBLEMS:
            console.print(f"[red]✗[/] … and {len(problems) - SHOWN_PROBLEMS} more problems")
        if problems:
            raise fail(f"audit of log {signed.body.log_id} found {len(problems)} problem(s); do not trust this log",
                       CHECK_FAILED)
        console.print(
            f"[green]✓[/] log {signed.body.log_id}: {size} entries, root {signed.body.root[:16]}… recomputed, "
            f"{len(records)} signatures valid, {len(balances)} credit accounts balanced, "
            f"{len(known_head)} earlier head(s) consistent"
        )
    _run(url, body)


def _check_entry(
    entry: dict[str, Any], index: int, problems: list[str], unknown: dict[str, int], records: list[bytes],
) -> None:
    try:
        claimed_index, claimed_cid, data = int(entry["index"]), str(entry["cid"]), bytes.fromhex(entry["record"])
    except (KeyError, TypeError, ValueError):
        problems.append(f"entry {index}: malformed in the node's answer")
        return
    if claimed_index != index:
        problems.append(f"entry {index}: the node labelled it {claimed_index}")
    if str(key_cid(cid_key(data))) != claimed_cid:
        problems.append(f"tampered entry {index}: its record bytes do not hash to its logged CID {claimed_cid}")
        return
    try:
        verify_record(data)
    except UnknownRecordType:
        name = str(decode_canonical(data).get("type"))[:80]
        unknown[name] = unknown.get(name, 0) + 1
        return
    except RecordError as exc:
        problems.append(f"tampered entry {index} ({claimed_cid}): {exc}")
        return
    records.append(data)


async def _check_known_head(
    client: AgoraClient, path: Path, current: Record[TreeHeadBody], tree: MerkleTree, problems: list[str],
) -> None:
    old = _load_head(path)
    if old.body.log_id != current.body.log_id:
        problems.append(f"{path} is a head of log {old.body.log_id}, not of {current.body.log_id}")
        return
    if old.body.size > current.body.size:
        problems.append(f"fork: the log once signed {old.body.size} entries ({path}), now only {current.body.size}")
        return
    if tree.size >= old.body.size and tree.root(old.body.size) != old.body.root_hash:
        problems.append(
            f"fork: the entries served now do not reproduce the head of size {old.body.size} saved in {path}; "
            "the log rewrote its history"
        )
    got = await client.consistency_proof(old.body.size, current.body.size)
    split = check_heads(old, current, got.hashes())
    if split is not None:
        problems.append(f"fork: head of size {old.body.size} ({path}) and the current head are inconsistent "
                        f"({split.reason})")
