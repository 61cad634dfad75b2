"""The one import point of the generated stubs; the rest of the code imports from here."""

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import ServiceDescriptor

from jobtrace.v1 import (
    attestation_service_pb2,
    attestation_service_pb2_grpc,
    common_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    schedule_service_pb2,
    schedule_service_pb2_grpc,
    trace_service_pb2,
    trace_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

__all__ = [
    "attestation_service_pb2",
    "attestation_service_pb2_grpc",
    "common_pb2",
    "duration_pb2",
    "job_service_pb2",
    "job_service_pb2_grpc",
    "schedule_service_pb2",
    "schedule_service_pb2_grpc",
    "struct_pb2",
    "timestamp_pb2",
    "trace_service_pb2",
    "trace_service_pb2_grpc",
    "worker_service_pb2",
    "worker_service_pb2_grpc",
]

SERVICE_NAMES = (
    job_service_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name,
    attestation_service_pb2.DESCRIPTOR.services_by_name["AttestationService"].full_name,
    schedule_service_pb2.DESCRIPTOR.services_by_name["ScheduleService"].full_name,
)


def service_descriptor(name: str) -> ServiceDescriptor:
    for module in (
        job_service_pb2,
        worker_service_pb2,
        trace_service_pb2,
        attestation_service_pb2,
        schedule_service_pb2,
    ):
        if name in module.DESCRIPTOR.services_by_name:
            found: ServiceDescriptor = module.DESCRIPTOR.services_by_name[name]
            return found
    raise KeyError(name)
