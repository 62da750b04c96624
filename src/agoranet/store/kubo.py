"""An optional kubo (IPFS) daemon beside the blockstore, spoken to over kubo's HTTP RPC API (`/api/v0`).

The blockstore puts every block it writes to kubo too, with kubo's block/put and the codec of the
block's own CID (raw for leaves, dag-pb for UnixFS nodes, dag-cbor for records), and refuses the
block if kubo answers with any other CID. A block missing here is read from kubo's repo and re-hashed
before it is accepted: the daemon is never trusted.

Reads ask kubo with `offline=true`, so kubo answers from its own repo at once and never searches the
IPFS network on Agora's behalf: such a search can stall for minutes per missing block, and storage
peers look up blocks they lack all the time. To use a DAG that lives elsewhere on IPFS, pin it on
the kubo first (`ipfs pin add CID`); Agora then reads it from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Self

import httpx

from agoranet.core.cid import CID, parse_cid
from agoranet.core.errors import InvalidCID
from agoranet.store.errors import KuboError, KuboMismatch, KuboUnavailable

__all__ = ["MIN_VERSION", "SOFT_BLOCK_LIMIT", "KuboClient", "block_get_request", "block_put_request", "connect_kubo",
           "pin_add_request"]

log = logging.getLogger(__name__)

API = "/api/v0"
# kubo refuses to put a block over 1 MiB unless told `allow-big-block`: bitswap does not carry
# bigger ones. Agora's importer never makes one, but CAR files and peers may bring up to 4 MiB.
SOFT_BLOCK_LIMIT = 1 << 20
# block/put gained `cid-codec` (CIDv1 of any codec) in go-ipfs 0.12; older daemons answer with CIDv0.
MIN_VERSION = (0, 12)


def _endpoint(rpc_url: str, command: str) -> str:
    return f"{rpc_url.rstrip('/')}{API}/{command}"


def block_put_request(rpc_url: str, cid: CID, data: bytes, *, pin: bool = False) -> httpx.Request:
    """The block/put call that stores `data` in kubo under exactly `cid` (same codec, sha2-256).

    The block travels as the single file of a multipart/form-data body, as kubo's own client sends it.
    """
    params = {"cid-codec": cid.codec.name, "mhtype": "sha2-256", "pin": "true" if pin else "false"}
    if len(data) > SOFT_BLOCK_LIMIT:
        params["allow-big-block"] = "true"
    return httpx.Request("POST", _endpoint(rpc_url, "block/put"), params=params,
                         files={"file": ("block", data, "application/octet-stream")})


def block_get_request(rpc_url: str, cid: CID) -> httpx.Request:
    """The block/get call for `cid`, answered from kubo's own repo only (see the module docstring)."""
    return httpx.Request("POST", _endpoint(rpc_url, "block/get"), params={"arg": str(cid), "offline": "true"})


def pin_add_request(rpc_url: str, cid: CID) -> httpx.Request:
    """The pin/add call that keeps the whole DAG under `cid` through kubo's gc (offline: no network search)."""
    return httpx.Request("POST", _endpoint(rpc_url, "pin/add"),
                         params={"arg": str(cid), "recursive": "true", "offline": "true"})


def _is_not_found(message: str) -> bool:
    # kubo words it "block was not found locally (offline): ipld: could not find <cid>".
    text = message.lower()
    return "not found" in text or "could not find" in text


def _parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text.split("-")[0])[:3])


class KuboClient:
    """One kubo daemon's RPC API: put, get and pin blocks; safe to share between threads."""

    def __init__(self, rpc_url: str, *, timeout: float = 60.0, connect_timeout: float = 5.0) -> None:
        self.url = rpc_url.rstrip("/")
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=connect_timeout))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, request: httpx.Request, what: str) -> httpx.Response:
        try:
            response = self._client.send(request)
        except httpx.TransportError as exc:
            raise KuboUnavailable(f"kubo RPC at {self.url} did not answer {what}: {exc or type(exc).__name__}") from exc
        return response

    @staticmethod
    def _message(response: httpx.Response) -> str:
        try:
            return str(json.loads(response.content)["Message"])
        except (ValueError, KeyError, TypeError):
            return response.text[:200] or f"HTTP {response.status_code}"

    def _fail(self, response: httpx.Response, what: str) -> KuboError:
        return KuboError(f"kubo RPC at {self.url} refused {what}: HTTP {response.status_code}: "
                         f"{self._message(response)}")

    def version(self) -> str:
        """The daemon's version; raises KuboUnavailable or KuboError when it cannot store Agora's blocks."""
        response = self._send(httpx.Request("POST", _endpoint(self.url, "version")), "a version request")
        try:
            response.raise_for_status()
            version = str(response.json()["Version"])
        except (httpx.HTTPStatusError, ValueError, KeyError, TypeError) as exc:
            raise KuboUnavailable(f"{self.url} answered {API}/version with HTTP {response.status_code} and no "
                                  "kubo version: it is not kubo's RPC API (its gateway port, perhaps)") from exc
        if _parse_version(version) < MIN_VERSION:
            raise KuboError(f"kubo {version} at {self.url} cannot store CIDv1 blocks of every codec",
                            hint=f"upgrade kubo to {'.'.join(map(str, MIN_VERSION))} or newer")
        return version

    def put(self, cid: CID, data: bytes) -> None:
        """Store the block in kubo; KuboMismatch unless kubo files it under exactly `cid`."""
        response = self._send(block_put_request(self.url, cid, data), f"block/put of {cid}")
        if response.status_code != 200:
            raise self._fail(response, f"block/put of {cid}")
        try:
            key = str(response.json()["Key"])
        except (ValueError, KeyError, TypeError) as exc:
            raise KuboError(f"kubo RPC at {self.url} answered block/put of {cid} with no CID") from exc
        try:
            same = bytes(parse_cid(key)) == bytes(cid)
        except InvalidCID:
            same = False
        if not same:
            raise KuboMismatch(f"kubo at {self.url} stored the block of {cid} as {key}")

    def get(self, cid: CID) -> bytes | None:
        """The block's bytes from kubo's repo, checked against `cid`; None when kubo does not have it."""
        response = self._send(block_get_request(self.url, cid), f"block/get of {cid}")
        if response.status_code != 200:
            if _is_not_found(self._message(response)):
                return None
            raise self._fail(response, f"block/get of {cid}")
        data = response.content
        if hashlib.sha256(data).digest() != cid.raw_digest:
            raise KuboMismatch(f"kubo at {self.url} returned bytes for {cid} that hash to something else; "
                               "they were not stored", hint="check the kubo repo with `ipfs repo verify`")
        log.debug("block read from kubo", extra={"cid": str(cid), "bytes": len(data)})
        return data

    def pin(self, cid: CID) -> bool:
        """Pin the DAG under `cid` in kubo; False when kubo lacks some of its blocks."""
        response = self._send(pin_add_request(self.url, cid), f"pin/add of {cid}")
        if response.status_code == 200:
            return True
        if _is_not_found(self._message(response)):
            return False
        raise self._fail(response, f"pin/add of {cid}")


def connect_kubo(rpc_url: str, **options: float) -> KuboClient:
    """A client of the kubo at `rpc_url`, once it has answered with a usable version (else a clear error)."""
    client = KuboClient(rpc_url, **options)
    try:
        version = client.version()
    except BaseException:
        client.close()
        raise
    log.info("kubo connected", extra={"rpc": client.url, "version": version})
    return client
