"""Generated gRPC stubs of jobtrace.v1; do not edit (make generate)."""
