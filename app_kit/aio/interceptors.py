"""Interceptors: code that runs around every call, on the server and on the client.

A server interceptor sees each call before its handler (method, metadata, peer, deadline),
wraps the handler (timing, error mapping, ending the call early by raising
:class:`~app_kit.GRPCError`), may observe or replace each message, and hears once when the
call ended, with its final status. A client interceptor runs before a call's request headers
go out (adding metadata, or failing the call), may observe or replace each message, and hears
once when the call ended.

Interceptors are listed outermost first. On the server ``[a, b]`` runs
``a.intercept(b.intercept(handler))``; a received message passes ``a`` then ``b``, a sent one
``b`` then ``a``; ``on_call_end`` runs in reverse order (``b`` then ``a``), and only for the
interceptors whose ``intercept`` started. On the client ``[a, b]`` runs ``a.start`` then
``b.start``; a sent message passes ``a`` then ``b``, a received one ``b`` then ``a``;
``on_call_end`` runs ``b`` then ``a``, for the interceptors whose ``start`` was called (one
that raised included). A call whose deadline had passed when it arrived goes through the
interceptors too, with a ``proceed`` that raises DEADLINE_EXCEEDED instead of running the
handler. A request refused for its headers never reaches them (as in grpc-core and grpc-go):
a method the server does not serve, a ``grpc-timeout``, ``grpc-encoding``, content-type or
metadata it cannot take, a header list over the limit.

Override only what you need: a hook left as the base class has it costs nothing per message,
and without interceptors a call pays only for counting its messages and bytes (the bench's
"interceptor cost" rows measure it).
The message hooks are plain functions (they run on the per-message path); do awaited work in
``intercept`` or ``start``.
"""

from __future__ import annotations

from .client import ClientInterceptor
from .hooks import Proceed
from .server import ServerInterceptor

__all__ = ["ClientInterceptor", "Proceed", "ServerInterceptor"]
