"""Layer 2: content-addressed storage — blocks on disk, UnixFS files and directories, CAR archives,
and an optional kubo (IPFS) daemon mirroring the blocks."""

from agoranet.store.blockstore import Blockstore, BlockFetcher, GcResult, verify_block
from agoranet.store.car import export_car, import_car
from agoranet.store.errors import (
    BlockMismatch, BlockNotFound, CorruptBlock, KuboError, KuboMismatch, KuboUnavailable, MalformedBlock, MalformedCar,
    NotAFile, PinError, StoreError, UnsupportedDag,
)
from agoranet.store.kubo import KuboClient, connect_kubo
from agoranet.store.unixfs import CHUNK_SIZE, MAX_LINKS, add_bytes, add_path, cat, export, import_path, model_cid

__all__ = [
    "Blockstore", "BlockFetcher", "GcResult", "verify_block", "export_car", "import_car", "add_bytes", "add_path",
    "cat", "export", "import_path", "model_cid", "CHUNK_SIZE", "MAX_LINKS",
    "StoreError", "BlockNotFound", "BlockMismatch", "CorruptBlock", "MalformedBlock", "MalformedCar", "NotAFile",
    "PinError", "UnsupportedDag", "KuboClient", "connect_kubo", "KuboError", "KuboUnavailable", "KuboMismatch",
]
