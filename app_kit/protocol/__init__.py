"""The sans-IO gRPC-over-HTTP/2 core: bytes in, events and bytes out. No sockets, no loop."""
