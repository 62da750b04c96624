"""`agora credits …`: what a gateway owes you, proven against its transparency log, trusting nothing it says."""

from __future__ import annotations

import typer

from agoranet.cli.console import CHECK_FAILED, UNREACHABLE, console, fail
from agoranet.core.errors import AgoraError
from agoranet.core.records import Record
from agoranet.log.credits import EarningsProof, verify_earnings
from agoranet.log.records import TreeHeadBody, check_heads
from agoranet.net.agora_client import AgoraClient, NodeError, call

__all__ = ["credits_app"]

credits_app = typer.Typer(help="Credits at a gateway: earnings statements proven against its log, balances.",
                          no_args_is_help=True)


@credits_app.command()
def statement(
    url: str = typer.Argument(..., help="gateway base URL, e.g. http://127.0.0.1:8300"),
    peer_id: str = typer.Argument(..., help="the provider's peer id (12D3KooW…)"),
) -> None:
    """Fetch a provider's signed earnings statement and prove every payment is in the gateway's log."""
    async def fetch(node: AgoraClient) -> tuple[EarningsProof, Record[TreeHeadBody], Record[TreeHeadBody], list[bytes]]:
        proof = EarningsProof.from_json((await node.credit_statement(peer_id)).proof)
        size = proof.statement.body.log_size
        # The head for the statement's tree comes from the log, not from the statement's answer,
        # and the log's current head must extend it: the gateway cannot show us a private fork.
        then, now = await node.log_head(size), await node.log_head()
        return proof, then, now, (await node.consistency_proof(size, now.body.size)).hashes()

    try:
        proof, then, now, consistency = call(url, fetch)
        body = proof.statement.body
        total = verify_earnings(proof, then)
        if body.account != f"provider:{peer_id}":
            raise fail(f"the gateway sent the statement of {body.account}, not of provider:{peer_id}", CHECK_FAILED)
        split = check_heads(then, now, consistency)
        if split is not None:
            raise fail(f"fork: the log's current head does not extend the statement's tree ({split.reason}); "
                        "keep the statement as evidence and stop trusting this gateway", CHECK_FAILED)
    except NodeError as exc:
        raise fail(exc) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise fail(f"the gateway's answer is malformed: {exc}", UNREACHABLE) from None
    except AgoraError as exc:  # a statement or proof that does not check out
        raise fail(exc, CHECK_FAILED) from None
    console.print(f"[green]✓[/] {peer_id} earned {total} micro-credits in {len(body.moves)} payments at gateway "
                  f"{proof.statement.signer}; every payment is in its log at size {body.log_size} "
                  f"(root {body.log_root[:16]}…), which its current head ({now.body.size} entries) extends")
