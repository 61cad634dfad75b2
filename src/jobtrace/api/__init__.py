"""gRPC servicers: decode, authorise, call the domain, encode, map errors."""
