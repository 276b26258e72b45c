"""Generated gRPC stubs of package specdec.v1."""
