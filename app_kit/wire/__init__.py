"""The wire layer, sans-IO HTTP/2: frame reading and flood limits, HPACK, and all coupling to
h2's, hpack's and hyperframe's internals. It knows nothing of gRPC and imports nothing above it.
"""
