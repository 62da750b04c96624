"""HTTP limits on every node: endless request headers and half-open connections are cut off."""

from __future__ import annotations

import socket
import time

import pytest

from agoranet.engine.stub import StubEngine
from agoranet.node.node import build_node
from agoranet.node.server import BackgroundServer, bind, url_of


@pytest.fixture
def node(tmp_path):
    sock = bind()
    built = build_node(tmp_path, url_of(sock), ["provider"], engine=StubEngine(model_name="agora-tiny"))
    with BackgroundServer(built.app, sock) as server:  # the limits every node serves with
        yield sock.getsockname()[:2], server


def closed_by_server(conn: socket.socket, timeout: float) -> bytes | None:
    """What the server said before closing `conn` within `timeout`, or None if it kept it open."""
    conn.settimeout(timeout)
    said = b""
    try:
        while piece := conn.recv(4096):
            said += piece
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return said


@pytest.mark.slow
def test_endless_headers_and_half_open_connections_are_cut_off(node):
    address, server = node
    # Headers that never end: the node answers 431 and closes long before 8 MiB went by.
    endless = socket.create_connection(address)
    endless.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    sent = 0
    with pytest.raises(OSError):
        while sent < 8 << 20:
            endless.sendall(b"X-Pad: " + b"a" * 4000 + b"\r\n")
            sent += 4009
    assert sent < 4 << 20, sent
    said = closed_by_server(endless, 5) or b""
    assert said == b"" or said.startswith(b"HTTP/1.1 431"), said

    # Hundreds of half-open connections (a request line, then silence) are closed with 408 once the
    # header deadline passes, instead of being held forever.
    started = time.monotonic()
    idle = []
    for _ in range(300):
        conn = socket.create_connection(address)
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        idle.append(conn)
    answers = [closed_by_server(conn, 20 - (time.monotonic() - started)) for conn in idle]
    assert all(a is not None and a.startswith(b"HTTP/1.1 408") for a in answers), answers[:3]
    for conn in [endless, *idle]:
        conn.close()
    # The node serves on, and an ordinary client is unaffected.
    ok = socket.create_connection(address)
    ok.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (closed_by_server(ok, 10) or b"").startswith(b"HTTP/1.1 200")
    ok.close()
