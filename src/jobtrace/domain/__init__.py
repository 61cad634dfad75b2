"""The rules of jobtrace: lifecycle, scheduling, validation; no gRPC, no SQL."""
