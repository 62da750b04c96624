"""Errors the store raises: missing, corrupt or malformed blocks, and unusable inputs."""

from __future__ import annotations

from agoranet.core.errors import AgoraError


class StoreError(AgoraError):
    """Something the content-addressed store could not do."""


class BlockNotFound(StoreError):
    hint = "fetch it from a peer with `agora store fetch CID --peer URL`, or add the data again"


class CorruptBlock(StoreError):
    hint = "the bad copy was quarantined; fetch the block again from a peer"


class MalformedBlock(StoreError, ValueError):
    hint = "the block is not valid dag-pb/UnixFS; it was not written by a conforming IPFS implementation"


class BlockMismatch(StoreError, ValueError):
    hint = "the peer sent bytes that do not hash to the CID asked for; try another peer"


class NotAFile(StoreError):
    hint = "use `agora store export CID DEST` for directories"


class UnsupportedDag(StoreError):
    hint = "Agora reads UnixFS files, directories and symlinks; HAMT-sharded directories are not supported yet"


class MalformedCar(StoreError, ValueError):
    hint = "the file is not a CAR v1 archive, or it is truncated"


class PinError(StoreError):
    hint = "fetch the missing blocks first (`agora store fetch CID --peer URL`), then pin"


class KuboError(StoreError):
    """The kubo (IPFS) daemon given with --kubo-rpc could not do what the store asked."""

    hint = ("check that the kubo daemon runs (`ipfs daemon`) and that --kubo-rpc or AGORA_KUBO_RPC is its RPC "
            "address (`ipfs config Addresses.API`, http://127.0.0.1:5001 by default), or leave --kubo-rpc out to use the local "
            "store alone")


class KuboUnavailable(KuboError):
    """Nothing answered at the kubo RPC address, or what answered is not kubo's RPC API."""


class KuboMismatch(KuboError):
    hint = "the kubo daemon disagrees with Agora about a block's CID or bytes; it was not trusted"
