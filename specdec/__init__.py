"""specdec: distributed speculative decoding.

This package is the shared core of the three services (``oracle_service``,
``draft_service``, ``gateway``): speculation maths, model loading, KV caches,
drafters, telemetry, the CLI and the application client. The maths modules
never import generated protobuf code; only the edges (``client``, ``cli``, the
services' servicers) do.
"""

__version__ = "0.1.0"
