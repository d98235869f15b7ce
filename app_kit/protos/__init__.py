"""Code generated from app_kit's own protos (health, reflection), in a private descriptor pool.

grpcio's health and reflection packages register the same ``grpc.*`` symbols in protobuf's
default pool; keeping ours apart lets both load in one process. Regenerate with
``python tools/generate_protos.py``.
"""

from google.protobuf import descriptor_pool

#: The pool holding app_kit's own message and service descriptors.
POOL = descriptor_pool.DescriptorPool()
