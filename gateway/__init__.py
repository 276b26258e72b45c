"""The gateway service: the public API, the session table and worker routing."""
