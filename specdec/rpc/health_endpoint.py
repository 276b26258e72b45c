"""A plaintext health port beside a service's main port (``health_host``/``health_port``).

Probes (``specdec healthcheck``, kubelet ``grpc:`` probes, Docker HEALTHCHECK)
speak neither TLS nor bearer tokens. When the main port requires mutual TLS,
the gateway and the oracle can also serve ``grpc.health.v1`` alone, in plaintext,
on a port of its own: it shares the main server's health servicer, so both
always answer the same (NOT_SERVING while loading, during shutdown).
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec.core.errors import InvalidArgument
from specdec.rpc.server import ServiceServer

log = logging.getLogger(__name__)


async def start_health_endpoint(host: str, port: int, main: ServiceServer) -> int | None:
    """Serve ``main``'s health on ``host:port`` (0 = any free port, < 0 = off).

    Returns the bound port (None when off); the endpoint stops after ``main`` does.
    """
    if port < 0:
        return None
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(main.health, server)
    reflection.enable_server_reflection(
        (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise InvalidArgument(
            f"cannot listen on {address} for the health endpoint; choose another --health-port"
        )
    await server.start()

    async def stop() -> None:
        await server.stop(0)

    main.on_stop.append(stop)
    log.info("health endpoint on %s:%d (plaintext, grpc.health.v1 only)", host, bound)
    return bound
