"""Asking another node over HTTP from the CLI: JSON or one clear reason why not."""

from __future__ import annotations

from typing import Any

import httpx

from agoranet.wire.openai import error_message


class NodeUnreachable(Exception):
    """The node could not be asked (network, HTTP error, not JSON): exit 2, not a verdict on what it serves."""


def get_json(client: httpx.Client, path: str, params: dict[str, Any] | None = None) -> Any:
    """GET `path` (None-valued params dropped); the node's own error message when it refuses."""
    try:
        response = client.get(path, params={k: v for k, v in (params or {}).items() if v is not None})
    except httpx.HTTPError as exc:
        raise NodeUnreachable(f"cannot reach {client.base_url}: {exc}; check the URL and that the node runs") from exc
    if response.status_code != 200:
        try:
            message = error_message(response.json())
        except ValueError:
            message = None
        message = message or response.text[:200]
        raise NodeUnreachable(f"{client.base_url}{path} answered {response.status_code}: {message}")
    try:
        return response.json()
    except ValueError as exc:
        raise NodeUnreachable(f"{client.base_url}{path} did not answer JSON") from exc
