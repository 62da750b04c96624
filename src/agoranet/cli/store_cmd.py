"""`agora store …`: add, read, export, pin and fetch content-addressed data in the local store."""

from __future__ import annotations

import asyncio
import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from agoranet.cli.console import console, err, fail
from agoranet.cli.progress import transfer_bar
from agoranet.cli.options import (
    HomeOpt, KuboRpcOpt, LogJsonOpt, PublicUrlOpt, RecheckOpt, home_dir, resolve_kubo_rpc,
)
from agoranet.core.errors import AgoraError

store_app = typer.Typer(help="Content-addressed storage: add files and models, pin them, move them as CAR files, "
                             "fetch them from peers.", no_args_is_help=True)


@contextmanager
def _store(home: Path | None, kubo_rpc: str | None = None) -> Iterator["Blockstore"]:  # noqa: F821 - lazy import
    """The local store; with `kubo_rpc` a kubo daemon mirrors it (commands that touch blocks pass it)."""
    from agoranet.store import Blockstore, connect_kubo

    with _fail_cleanly():
        store = Blockstore(home_dir(home) / "blocks", kubo=connect_kubo(kubo_rpc) if kubo_rpc else None)
        try:
            yield store
        finally:
            store.close()


@contextmanager
def _fail_cleanly() -> Iterator[None]:
    """Turn Agora's errors into one line on stderr and exit status 1."""
    try:
        yield
    except AgoraError as exc:
        raise fail(exc) from None
    except OSError as exc:
        hint = " (free some space or use another --home; nothing partial was kept)" if exc.errno == errno.ENOSPC else ""
        raise fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ") + hint) from None


@store_app.command()
def add(path: Annotated[Path, typer.Argument(help="file or directory (a model directory, say)")],
        home: HomeOpt = None,
        hidden: Annotated[bool, typer.Option(help="include files whose names start with a dot")] = False,
        pin: Annotated[bool, typer.Option(help="pin it so gc keeps it")] = True,
        kubo_rpc: KuboRpcOpt = None) -> None:
    """Add a file or directory; prints its CID (the same CID IPFS gives with CIDv1, raw leaves, 1 MiB chunks)."""
    from agoranet.store import add_path

    with _store(home, resolve_kubo_rpc(kubo_rpc)) as store:
        cid = add_path(store, path, pin=pin, hidden=hidden)
    console.print(str(cid), highlight=False)


@store_app.command()
def cat(cid: str, home: HomeOpt = None, kubo_rpc: KuboRpcOpt = None) -> None:
    """Write a file's bytes to stdout, verifying every block."""
    from agoranet.store import cat as cat_file

    with _store(home, resolve_kubo_rpc(kubo_rpc)) as store:
        out = sys.stdout.buffer
        for piece in cat_file(store, cid):
            out.write(piece)
        out.flush()


@store_app.command()
def export(cid: str, dest: Path, home: HomeOpt = None, kubo_rpc: KuboRpcOpt = None) -> None:
    """Write the file or directory at CID to DEST (which must not exist)."""
    from agoranet.store import export as export_tree

    with _store(home, resolve_kubo_rpc(kubo_rpc)) as store:
        export_tree(store, cid, dest)
    console.print(f"exported {cid} to {dest}", highlight=False)


@store_app.command("export-car")
def export_car(cid: str, file: Path, home: HomeOpt = None, kubo_rpc: KuboRpcOpt = None) -> None:
    """Write the DAG at CID to a CAR v1 file (for IPFS, Filecoin or Arweave bundlers)."""
    from agoranet.store import export_car as write_car

    with _store(home, resolve_kubo_rpc(kubo_rpc)) as store:
        tmp = file.with_name(file.name + ".partial")
        with open(tmp, "wb") as f:
            count = write_car(store, cid, f)
        tmp.replace(file)
    console.print(f"wrote {count} blocks to {file}", highlight=False)


@store_app.command("import-car")
def import_car(file: Path, home: HomeOpt = None, kubo_rpc: KuboRpcOpt = None) -> None:
    """Import a CAR v1 file, verifying every block; complete roots are pinned and printed."""
    from agoranet.store import import_car as read_car

    with _store(home, resolve_kubo_rpc(kubo_rpc)) as store:
        with open(file, "rb") as f:
            roots = read_car(store, f)
    for root in roots:
        console.print(str(root), highlight=False)


@store_app.command()
def pin(cid: str, home: HomeOpt = None, kubo_rpc: KuboRpcOpt = None) -> None:
    """Pin a DAG whose blocks are all here, so gc keeps it."""
    with _store(home, resolve_kubo_rpc(kubo_rpc)) as store:
        store.pin(cid)
    console.print(f"pinned {cid}", highlight=False)


@store_app.command()
def unpin(cid: str, home: HomeOpt = None) -> None:
    """Remove a pin; the blocks go at the next gc."""
    with _store(home) as store:
        if not store.unpin(cid):
            raise AgoraError(f"{cid} is not pinned", hint="list the pinned CIDs with `agora store pins`")
    console.print(f"unpinned {cid}", highlight=False)


@store_app.command()
def pins(home: HomeOpt = None) -> None:
    """List pinned CIDs, oldest first."""
    with _store(home) as store:
        for cid in store.pins():
            console.print(str(cid), highlight=False)


@store_app.command()
def gc(home: HomeOpt = None) -> None:
    """Delete every block not reachable from a pin."""
    with _store(home) as store:
        result = store.gc()
    console.print(f"removed {result.removed} blocks, freed {result.freed_bytes:,} bytes", highlight=False)


@store_app.command()
def fetch(cid: str,
          peer: Annotated[list[str], typer.Option("--peer", help="storage peer URL; repeat to fetch from several")],
          home: HomeOpt = None,
          pin_it: Annotated[bool, typer.Option("--pin/--no-pin", help="pin it once complete")] = True,
          kubo_rpc: KuboRpcOpt = None) -> None:
    """Fetch a DAG from storage peers in parallel, verifying every block."""
    from agoranet.net.storage_client import fetch_dag

    with _store(home, resolve_kubo_rpc(kubo_rpc)) as store:
        with transfer_bar("fetch", err) as bar:
            stats = asyncio.run(fetch_dag(store, cid, peer, progress=bar.update))
        if pin_it:
            store.pin(cid)
    sources = ", ".join(f"{url} {n}" for url, n in stats.by_peer.most_common())
    console.print(f"fetched {cid}: {stats.blocks} blocks ({stats.local_blocks} already here)"
                  + (f"; from {sources}" if sources else ""), highlight=False)


@store_app.command()
def serve(home: HomeOpt = None, host: str = "127.0.0.1", port: int = 8500,
          peer: Annotated[Optional[list[str]], typer.Option("--peer", help="other storage peer URL; repeat")] = None,
          public_url: PublicUrlOpt = None,
          recheck: RecheckOpt = 60.0,
          kubo_rpc: KuboRpcOpt = None,
          log_json: LogJsonOpt = None) -> None:
    """Run a storage peer: serve blocks, keep pins at their replication factor, repair when peers leave."""
    from agoranet.cli.node_cmd import serve_node
    from agoranet.node.node import StorageOptions

    storage = StorageOptions(peers=list(peer or []), recheck_interval_s=recheck, kubo_rpc=resolve_kubo_rpc(kubo_rpc))
    serve_node(["storage"], home=home, host=host, port=port, public_url=public_url, log_json=log_json,
               watch=peer or [], storage=storage)  # its replication peers show on its dashboard
