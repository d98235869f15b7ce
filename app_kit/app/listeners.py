"""Listening sockets bound ahead of the server: before an App's resources start, and by the
``--workers`` supervisor for the workers to share (see :mod:`app_kit.app.workers`)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat

__all__ = ["LISTEN_FDS", "REUSE_PORT", "bind_tcp", "bind_unix", "worker_listen_options"]

# How the supervisor tells a worker how to listen (read, and removed, by worker_listen_options):
# the inherited listening sockets' file descriptors, or "1" to bind with SO_REUSEPORT.
LISTEN_FDS = "_APP_KIT_LISTEN_FDS"
REUSE_PORT = "_APP_KIT_REUSE_PORT"


def bind_tcp(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Sockets bound, not listening, to every address of ``host``, all on one ``port``.

    Port 0 picks one free port (on the first address) for every address. Options as asyncio's
    ``create_server`` sets them: SO_REUSEADDR, and IPV6_V6ONLY so that ``::`` is IPv6 only.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: set[tuple[int, object]] = set()
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_unix(path: str) -> socket.socket:
    """A Unix stream socket bound, not listening, at ``path`` (a stale socket file there is
    replaced, as asyncio's ``create_unix_server`` does)."""
    if not path.startswith("\0"):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.remove(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    return sock


def worker_listen_options() -> tuple[list[socket.socket], bool]:
    """In a worker: the listening sockets inherited from the supervisor (none outside
    ``--workers``), and whether to bind with SO_REUSEPORT.

    The variables are removed, so that the App's own subprocesses do not inherit them.
    """
    fds = os.environ.pop(LISTEN_FDS, "")
    reuse_port = os.environ.pop(REUSE_PORT, "") == "1"
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd], reuse_port
