"""`agora credits …`: what a gateway owes you, proven against its transparency log, trusting nothing it says."""

from __future__ import annotations


import httpx
import typer

from agoranet.cli.console import console, fail
from agoranet.cli.remote import NodeUnreachable, get_json
from agoranet.core.errors import AgoraError
from agoranet.log.credits import EarningsProof, verify_earnings
from agoranet.log.records import check_heads, verify_tree_head

__all__ = ["credits_app"]

credits_app = typer.Typer(help="Credits at a gateway: earnings statements proven against its log, balances.",
                          no_args_is_help=True)


@credits_app.command()
def statement(
    url: str = typer.Argument(..., help="gateway base URL, e.g. http://127.0.0.1:8300"),
    peer_id: str = typer.Argument(..., help="the provider's peer id (12D3KooW…)"),
) -> None:
    """Fetch a provider's signed earnings statement and prove every payment is in the gateway's log."""
    try:
        with httpx.Client(base_url=url.rstrip("/"), timeout=30.0) as client:
            answer = get_json(client, f"/agora/v1/credits/statement/{peer_id}")
            proof = EarningsProof.from_json(answer["proof"])
            body = proof.statement.body
            # The head for the statement's tree comes from the log, not from the statement's answer,
            # and the log's current head must extend it: the gateway cannot show us a private fork.
            then = verify_tree_head(get_json(client, "/agora/v1/log/head", {"size": body.log_size}))
            now = verify_tree_head(get_json(client, "/agora/v1/log/head"))
            consistency = get_json(client, "/agora/v1/log/proof/consistency",
                                   {"first": body.log_size, "second": now.body.size})
        total = verify_earnings(proof, then)
        if body.account != f"provider:{peer_id}":
            raise fail(f"the gateway sent the statement of {body.account}, not of provider:{peer_id}")
        split = check_heads(then, now, [bytes.fromhex(h) for h in consistency["proof"]])
        if split is not None:
            raise fail(f"fork: the log's current head does not extend the statement's tree ({split.reason}); "
                        "keep the statement as evidence and stop trusting this gateway")
    except NodeUnreachable as exc:
        raise fail(str(exc), 2) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise fail(f"the gateway's answer is malformed: {exc}") from None
    except AgoraError as exc:
        raise fail(str(exc)) from None
    console.print(f"[green]✓[/] {peer_id} earned {total} micro-credits in {len(body.moves)} payments at gateway "
                  f"{proof.statement.signer}; every payment is in its log at size {body.log_size} "
                  f"(root {body.log_root[:16]}…), which its current head ({now.body.size} entries) extends")
