"""The HTTP listener (--http-listen): JobService, TraceService and
AttestationService over the Connect protocol, and an EventSource endpoint of
a run's trace, served by uvicorn in the gRPC server's own event loop.

Nothing here is a second copy of a rule: every Connect call is answered by
the gRPC servicers (api/*_service.py) themselves, through a context that
gives them what a gRPC context would (metadata, deadline, abort), so
validation, authentication, roles, tenancy, limits and the error mapping are
the ones gRPC callers get."""
