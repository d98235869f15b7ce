"""The gRPC layer, sans-IO: length-prefixed messages and their compression, request and response
heads, metadata, grpc-timeout, statuses, and the server and client sides of a connection, which
turn bytes into events (:mod:`.events`) and calls' outcomes into frames. It builds on the wire
layer only; importing it loads no I/O framework and no pydantic.
"""
