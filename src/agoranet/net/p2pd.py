"""The go-libp2p daemon (`p2pd`): starting and stopping one, and its control protocol over a unix socket.

This module owns that wire format in both directions: varint-delimited protobuf messages from
`p2pd.proto` (vendored from the hivemind 1.1.12 wheel that ships the binary; `_p2pd_pb2` is protoc's
output for it). One control connection carries one request; a subscription, a DHT query's answers
or an opened stream then keep the connection for themselves, as the daemon's protocol has it.
The binary is found in an installed `hivemind` wheel (`agoranet[p2p]`) without importing hivemind.

The control protocol has no pubsub validator hook: the daemon forwards what GossipSub's own checks
(author signature, seen-cache) pass, and the Agora node validates every record it receives itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import ipaddress
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agoranet.core.errors import AgoraError
from agoranet.core.identity import Identity, PeerId

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 << 20  # a control message larger than this is a broken daemon, not data


class P2PError(AgoraError):
    """The libp2p daemon could not be started or did not do what it was asked."""

    hint = "see the daemon's log in the node's p2p directory, or run with --discovery http"


class P2PDaemonMissing(P2PError):
    hint = ("install the go-libp2p daemon with `pip install 'agoranet[p2p]'` (it ships in the hivemind wheel), "
            "set AGORA_P2PD to a p2pd binary, or run with --discovery http")


def _pb() -> Any:
    try:
        from agoranet.net import _p2pd_pb2
    except ImportError as exc:  # protobuf missing or older than the generated code needs
        raise P2PDaemonMissing(f"the libp2p control protocol needs the protobuf package: {exc}") from None
    return _p2pd_pb2


def find_p2pd(explicit: Path | None = None) -> Path:
    """The p2pd binary: the one given, else `$AGORA_P2PD`, else the one in an installed hivemind wheel
    (not imported), else a `p2pd` on the PATH."""
    if explicit is None and os.environ.get("AGORA_P2PD"):
        explicit = Path(os.environ["AGORA_P2PD"])
    if explicit is not None:
        if not os.access(explicit, os.X_OK):
            raise P2PDaemonMissing(f"{explicit} is not an executable p2pd binary")
        return explicit
    spec = importlib.util.find_spec("hivemind")  # locates the package without running its __init__
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            if os.access(path := Path(root) / "hivemind_cli" / "p2pd", os.X_OK):
                return path
    if found := shutil.which("p2pd"):
        return Path(found)
    raise P2PDaemonMissing("no go-libp2p daemon (p2pd) found")


# -- multiaddrs -------------------------------------------------------------------------------------

# protocol name -> (code, size in bytes; 0: none, -1: varint-prefixed)
_PROTOCOLS: dict[str, tuple[int, int]] = {
    "ip4": (4, 4), "tcp": (6, 2), "udp": (273, 2), "ip6": (41, 16), "dns": (53, -1), "dns4": (54, -1),
    "dns6": (55, -1), "p2p-circuit": (290, 0), "unix": (400, -1), "p2p": (421, -1), "quic": (460, 0),
    "quic-v1": (461, 0), "tls": (448, 0), "noise": (454, 0), "ws": (477, 0), "webtransport": (465, 0),
}
_BY_CODE = {code: (name, size) for name, (code, size) in _PROTOCOLS.items()}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i


def multiaddr_bytes(text: str) -> bytes:
    """Binary form of a text multiaddr such as /ip4/127.0.0.1/tcp/4001/p2p/12D3…."""
    parts = text.strip("/").split("/")
    out = bytearray()
    i = 0
    while i < len(parts):
        name = parts[i]
        if name not in _PROTOCOLS:
            raise ValueError(f"multiaddr {text!r}: unknown protocol {name!r}")
        code, size = _PROTOCOLS[name]
        out += _varint(code)
        if size == 0:
            i += 1
            continue
        value = "/" + "/".join(parts[i + 1:]) if name == "unix" else (parts[i + 1] if i + 1 < len(parts) else None)
        if value is None:
            raise ValueError(f"multiaddr {text!r}: {name} needs a value")
        if name == "ip4":
            out += ipaddress.IPv4Address(value).packed
        elif name == "ip6":
            out += ipaddress.IPv6Address(value).packed
        elif name in ("tcp", "udp"):
            out += int(value).to_bytes(2, "big")
        else:
            raw = PeerId.parse(value).to_bytes() if name == "p2p" else value.encode()
            out += _varint(len(raw)) + raw
        i = len(parts) if name == "unix" else i + 2
    return bytes(out)


def multiaddr_text(data: bytes) -> str:
    """Text form of a binary multiaddr (protocols this module does not know end it with `/…`)."""
    out: list[str] = []
    i = 0
    while i < len(data):
        code, i = _read_varint(data, i)
        if code not in _BY_CODE:
            return "".join(out) + "/…"
        name, size = _BY_CODE[code]
        if size == -1:
            size, i = _read_varint(data, i)
        raw, i = data[i:i + size], i + size
        if name == "ip4":
            value = str(ipaddress.IPv4Address(raw))
        elif name == "ip6":
            value = str(ipaddress.IPv6Address(raw))
        elif name in ("tcp", "udp"):
            value = str(int.from_bytes(raw, "big"))
        elif name == "p2p":
            value = str(PeerId.from_bytes(raw))
        else:
            value = raw.decode(errors="replace")
        out.append(f"/{name}" + (f"/{value.lstrip('/')}" if size else ""))
    return "".join(out)


# -- the control protocol ---------------------------------------------------------------------------

async def _write(writer: asyncio.StreamWriter, message: Any) -> None:
    data = message.SerializeToString()
    writer.write(_varint(len(data)) + data)
    await writer.drain()


async def read_delimited(reader: asyncio.StreamReader, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """One varint-length-prefixed message (raises IncompleteReadError at the end of the stream)."""
    shift = size = 0
    while True:
        byte = (await reader.readexactly(1))[0]
        size |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
        if shift > 35:
            raise P2PError("the daemon sent a malformed length prefix")
    if size > max_bytes:
        raise P2PError(f"the daemon sent a {size}-byte message (most {max_bytes})")
    return await reader.readexactly(size)


async def write_delimited(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(_varint(len(data)) + data)
    await writer.drain()


@dataclass(frozen=True)
class PeerInfo:
    peer: PeerId | None  # None: not an Ed25519 peer (Agora only knows those)
    addrs: tuple[str, ...]


@dataclass(frozen=True)
class PubSubMessage:
    author: PeerId | None  # the peer that signed the message (GossipSub checks that signature)
    data: bytes
    topics: tuple[str, ...]


class ControlClient:
    """Requests to one daemon over its unix control socket."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.pb = _pb()

    async def _open(self, request: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]:
        """Send one request on a fresh connection; the connection and the daemon's OK answer."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path), limit=MAX_MESSAGE_BYTES)
        try:
            await _write(writer, request)
            response = self.pb.Response()
            response.ParseFromString(await read_delimited(reader))
        except BaseException:
            writer.close()
            raise
        if response.type == self.pb.Response.ERROR:
            writer.close()
            raise P2PError(f"the libp2p daemon refused {self.pb.Request.Type.Name(request.type)}: {response.error.msg}")
        return reader, writer, response

    async def _call(self, request: Any) -> Any:
        _, writer, response = await self._open(request)
        writer.close()
        return response

    async def identify(self) -> tuple[PeerId, list[str]]:
        r = await self._call(self.pb.Request(type=self.pb.Request.IDENTIFY))
        return PeerId.from_bytes(r.identify.id), [multiaddr_text(a) for a in r.identify.addrs]

    async def connect(self, peer: PeerId, addrs: list[str], timeout_s: float = 10.0) -> None:
        await self._call(self.pb.Request(type=self.pb.Request.CONNECT, connect=self.pb.ConnectRequest(
            peer=peer.to_bytes(), addrs=[multiaddr_bytes(a) for a in addrs], timeout=int(timeout_s))))

    async def disconnect(self, peer: PeerId) -> None:
        await self._call(self.pb.Request(type=self.pb.Request.DISCONNECT,
                                         disconnect=self.pb.DisconnectRequest(peer=peer.to_bytes())))

    async def list_peers(self) -> list[PeerInfo]:
        r = await self._call(self.pb.Request(type=self.pb.Request.LIST_PEERS))
        return [_peer_info(p) for p in r.peers]

    async def provide(self, cid: bytes, timeout_s: float = 60.0) -> None:
        """Announce this peer as a provider of `cid` (binary CID) to the DHT's closest peers."""
        await self._call(self.pb.Request(type=self.pb.Request.DHT, dht=self.pb.DHTRequest(
            type=self.pb.DHTRequest.PROVIDE, cid=cid, timeout=int(timeout_s))))

    async def providers(self, cid: bytes, count: int = 20, timeout_s: float = 10.0) -> AsyncIterator[PeerInfo]:
        """Peers the DHT lists as providers of `cid` (binary CID), each as soon as the daemon finds it;
        the query ends at `count` of them (closing the iterator early ends it too). Records outlive
        dead peers."""
        reader, writer, response = await self._open(self.pb.Request(type=self.pb.Request.DHT, dht=self.pb.DHTRequest(
            type=self.pb.DHTRequest.FIND_PROVIDERS, cid=cid, count=count, timeout=max(1, int(timeout_s)))))
        try:
            if response.dht.type != self.pb.DHTResponse.BEGIN:  # one answer, not a stream
                if response.dht.HasField("peer"):
                    yield _peer_info(response.dht.peer)
                return
            while True:
                item = self.pb.DHTResponse()
                item.ParseFromString(await read_delimited(reader))
                if item.type == self.pb.DHTResponse.END:
                    return
                yield _peer_info(item.peer)
        finally:
            writer.close()

    async def find_providers(self, cid: bytes, count: int = 20, timeout_s: float = 10.0) -> list[PeerInfo]:
        """All the providers `providers` yields (at most `count`), once the query has ended."""
        return [p async for p in self.providers(cid, count, timeout_s)]

    async def publish(self, topic: str, data: bytes) -> None:
        await self._call(self.pb.Request(type=self.pb.Request.PUBSUB, pubsub=self.pb.PSRequest(
            type=self.pb.PSRequest.PUBLISH, topic=topic, data=data)))

    async def topic_peers(self, topic: str) -> list[PeerId]:
        r = await self._call(self.pb.Request(type=self.pb.Request.PUBSUB, pubsub=self.pb.PSRequest(
            type=self.pb.PSRequest.LIST_PEERS, topic=topic)))
        return [PeerId.from_bytes(p) for p in r.pubsub.peerIDs]

    async def subscribe(self, topic: str) -> AsyncIterator[PubSubMessage]:
        """Messages on `topic` until the iterator is closed (which unsubscribes)."""
        reader, writer, _ = await self._open(self.pb.Request(type=self.pb.Request.PUBSUB, pubsub=self.pb.PSRequest(
            type=self.pb.PSRequest.SUBSCRIBE, topic=topic)))
        try:
            while True:
                message = self.pb.PSMessage()
                message.ParseFromString(await read_delimited(reader))
                try:
                    author = PeerId.from_bytes(getattr(message, "from"))
                except AgoraError:
                    author = None
                yield PubSubMessage(author, message.data, tuple(message.topicIDs))
        finally:
            writer.close()

    async def stream_handler(self, protocol: str, socket_path: Path) -> None:
        """Have the daemon hand each inbound `protocol` stream to a connection on `socket_path`."""
        handler = self.pb.StreamHandlerRequest(addr=multiaddr_bytes(f"/unix{socket_path}"), proto=[protocol],
                                               balanced=False)
        await self._call(self.pb.Request(type=self.pb.Request.STREAM_HANDLER, streamHandler=handler))

    async def stream_open(self, peer: PeerId, protocol: str,
                          timeout_s: float = 10.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to `peer` speaking `protocol` (the daemon dials the peer first if needed)."""
        opening = self.pb.StreamOpenRequest(peer=peer.to_bytes(), proto=[protocol], timeout=max(1, int(timeout_s)))
        reader, writer, _ = await self._open(self.pb.Request(type=self.pb.Request.STREAM_OPEN, streamOpen=opening))
        return reader, writer

    async def read_stream_info(self, reader: asyncio.StreamReader) -> PeerId | None:
        """The header the daemon writes on a handed-over inbound stream: which peer opened it."""
        info = self.pb.StreamInfo()
        info.ParseFromString(await read_delimited(reader))
        try:
            return PeerId.from_bytes(info.peer)
        except AgoraError:
            return None


def _peer_info(pb_info: Any) -> PeerInfo:
    try:
        peer: PeerId | None = PeerId.from_bytes(pb_info.id)
    except AgoraError:
        peer = None
    return PeerInfo(peer, tuple(multiaddr_text(a) for a in pb_info.addrs))


# -- the daemon process -----------------------------------------------------------------------------

@dataclass(frozen=True)
class DaemonOptions:
    """What the daemon is started with. NAT traversal is off unless asked for: it needs other peers'
    help (AutoNAT, relays) that a LAN or a test has no use for."""

    binary: Path | None = None  # default: find_p2pd()
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)  # libp2p host addresses (not the control socket)
    announce: tuple[str, ...] = ()  # addresses to announce instead of the listening ones
    bootstrap: tuple[str, ...] = ()  # /ip4/…/tcp/…/p2p/12D3… peers to join the network through (see join())
    autonat: bool = False  # AutoNAT service: tell peers whether they are reachable
    nat_port_map: bool = False  # UPnP / NAT-PMP port mapping on the router
    relay: bool = False  # circuit relay v2 (client), so peers behind NAT can be reached through relays
    auto_relay: bool = False  # find and use relays automatically when not publicly reachable
    relay_service: bool = False  # act as a relay for others
    # GossipSub's mesh heartbeat (mesh upkeep, IHAVE gossip to every connected peer; 0: the daemon's 1 s).
    # 3 s, not 1: it is most of an idle node's p2pd CPU once it is connected to many peers (5 s cut idle
    # CPU from 0.52 to 0.40 %/node at N = 30, benchmarks/discovery.py). Delivery over a formed mesh does
    # not wait for it; what does: a node that just joined publishes to no one until its next heartbeat
    # fills its mesh (libp2p discovery republishes its records then), and the repair of a lost message
    # by gossip (heartbeats are resent every round, offers every few rounds anyway).
    gossipsub_heartbeat_ms: int = 3000
    # Its first heartbeat, after the daemon starts: late enough that a node has joined its bootstrap
    # peers by then, so that heartbeat fills its mesh (the daemon's 100 ms comes before the join, and the
    # mesh then waited a whole heartbeat interval); 0: the daemon's.
    gossipsub_initial_delay_ms: int = 1000
    # Go threads running at once (GOMAXPROCS; a GOMAXPROCS in the environment wins; 0: one per core).
    # One: discovery's traffic is small, and with one a daemon's idle wake-ups hand work between fewer
    # threads (10-14 % less idle CPU for p2pd, two runs at 10-12 nodes); it also bounds what a flood can take.
    go_max_procs: int = 1
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def args(self, binary: Path, control: Path, key_file: Path) -> list[str]:
        args = [str(binary), "-listen", f"/unix{control}", "-id", str(key_file),
                "-hostAddrs", ",".join(self.listen), "-dhtServer", "-pubsub", "-pubsubRouter", "gossipsub",
                f"-relay={str(self.relay or self.auto_relay or self.relay_service).lower()}",
                f"-relayService={str(self.relay_service).lower()}", "-q"]
        if self.announce:
            args += ["-announceAddrs", ",".join(self.announce)]
        # No -b: the daemon would exit when a bootstrap peer is down (and without -bootstrapPeers dial the
        # public IPFS ones); the node dials its bootstrap peers itself, and again whenever it has none.
        if self.autonat:
            args.append("-autonat")
        if self.nat_port_map:
            args.append("-natPortMap")
        if self.auto_relay:
            args.append("-autoRelay")
        if self.gossipsub_heartbeat_ms:
            args += ["-gossipsubHeartbeatInterval", f"{self.gossipsub_heartbeat_ms}ms"]
        if self.gossipsub_initial_delay_ms:
            args += ["-gossipsubHeartbeatInitialDelay", f"{self.gossipsub_initial_delay_ms}ms"]
        return args + list(self.extra_args)


def _die_with_parent() -> None:
    """In the daemon before exec: SIGTERM when the node's process dies, so no daemon outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class P2PDaemon:
    """One p2pd process run for one node: its identity, its control socket in a private temp dir."""

    def __init__(self, identity: Identity, options: DaemonOptions | None = None, *,
                 log_dir: Path | None = None) -> None:
        self.identity = identity
        self.options = options or DaemonOptions()
        self.log_dir = log_dir
        self._dir: Path | None = None
        self._process: asyncio.subprocess.Process | None = None
        self.client: ControlClient | None = None
        self.addrs: list[str] = []

    @property
    def dir(self) -> Path:
        assert self._dir is not None, "the daemon is not started"
        return self._dir

    async def start(self, timeout_s: float = 60.0) -> ControlClient:
        binary = find_p2pd(self.options.binary)
        _pb()
        # unix socket paths are limited to 107 bytes: a short private dir, not the node's home
        self._dir = Path(tempfile.mkdtemp(prefix="agora-p2p-"))
        key_file, control = self._dir / "identity.p2p.key", self._dir / "control.sock"
        self.identity.save_libp2p_key(key_file)
        log_path = (self.log_dir or self._dir) / "p2pd.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.options.go_max_procs and "GOMAXPROCS" not in env:
            env["GOMAXPROCS"] = str(self.options.go_max_procs)
        with open(log_path, "ab") as out:
            self._process = await asyncio.create_subprocess_exec(
                *self.options.args(binary, control, key_file), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=out, env=env, preexec_fn=_die_with_parent)
        client = ControlClient(control)
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.returncode is not None:
                tail = log_path.read_text(errors="replace")[-800:].strip()
                status = self._process.returncode
                await self.stop()
                raise P2PError(f"the libp2p daemon exited with status {status}: {tail or 'no output'}")
            try:
                peer, self.addrs = await client.identify() if control.exists() else (None, [])
            except (OSError, asyncio.IncompleteReadError):
                peer = None
            if peer is not None:
                break
            if time.monotonic() > deadline:
                await self.stop()
                raise P2PError(f"the libp2p daemon did not answer on {control} within {timeout_s:.0f} s")
            await asyncio.sleep(0.05)
        with contextlib.suppress(OSError):
            key_file.unlink()  # the daemon has read it; no copy of the key stays in /tmp
        if peer != self.identity.peer_id:
            await self.stop()
            raise P2PError(f"the libp2p daemon runs as {peer}, not as this node ({self.identity.peer_id})")
        self.client = client
        log.info("libp2p daemon %s up; others join with --bootstrap %s", peer, " --bootstrap ".join(self.multiaddrs()))
        return client

    async def join(self) -> int:
        """Dial the bootstrap peers (those that answer; a down one is no error): how many were reached."""
        client = self.client
        if client is None or not self.options.bootstrap:
            return 0

        async def dial(addr: str) -> bool:
            where, _, peer = addr.rpartition("/p2p/")
            try:
                await client.connect(PeerId.parse(peer), [where], timeout_s=5.0)
                return True
            except (OSError, asyncio.IncompleteReadError, AgoraError) as exc:
                log.info("bootstrap peer %s not reached: %s", addr, exc)
                return False

        return sum(await asyncio.gather(*(dial(a) for a in self.options.bootstrap)))

    def multiaddrs(self) -> list[str]:
        """Where other nodes can bootstrap from this one: /ip4/…/tcp/…/p2p/12D3…."""
        return [f"{a}/p2p/{self.identity.peer_id}" for a in self.addrs]

    async def stop(self) -> None:
        process, self._process, self.client = self._process, None, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5.0)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """Kill the daemon at once, as a crash would (churn tests)."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
