"""`specdec healthcheck ADDRESS`: exit 0 iff the gRPC health service says SERVING.

Used by container HEALTHCHECKs; Kubernetes can use its native grpc probe instead.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 3.0) -> bool:
    """Whether ``service`` ("" = the whole server) at ``address`` is SERVING."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
