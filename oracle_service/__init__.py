"""The oracle service: holds the big model and verifies drafted blocks over gRPC.

``specdec oracle`` runs ``oracle_service.main:main``. Layers, outermost first:
``servicer`` (protobuf <-> core), ``engine`` (one model thread, validation,
timing), ``sessions`` (per-session KV caches under a memory budget).
"""
