"""gRPC plumbing shared by the three services: server start-up and shutdown,
interceptors, channels, and protobuf <-> core conversions. The only part of
the core package that imports generated stubs besides the client and CLI."""
