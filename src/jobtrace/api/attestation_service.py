"""AttestationService: signed evidence and annotations."""

from __future__ import annotations

from typing import Any

from jobtrace.api import convert
from jobtrace.api.errors import rpc
from jobtrace.api.limits import PageBytes
from jobtrace.auth import Authenticator, Role
from jobtrace.domain.annotations import Annotations
from jobtrace.domain.attest import Attestor
from jobtrace.model import Caller
from jobtrace.pb import attestation_service_pb2 as pb
from jobtrace.pb import attestation_service_pb2_grpc as pb_grpc


class AttestationServicer(pb_grpc.AttestationServiceServicer):
    def __init__(
        self,
        attestor: Attestor,
        annotations: Annotations,
        auth: Authenticator,
        *,
        pages: PageBytes,
    ) -> None:
        self._attestor = attestor
        self._annotations = annotations
        self._auth = auth
        self._pages = pages

    @rpc
    async def GetAttestation(
        self, request: pb.GetAttestationRequest, context: Any
    ) -> pb.GetAttestationResponse:
        principal = self._auth.require(context, Role.READER)
        found = await self._attestor.get(principal.read_scope, request.key)
        envelope = (
            convert.envelope_to_proto(await self._attestor.export(found))
            if request.include_envelope
            else None
        )
        return pb.GetAttestationResponse(
            attestation=convert.attestation_to_proto(found), envelope=envelope
        )

    @rpc
    async def ListAttestations(
        self, request: pb.ListAttestationsRequest, context: Any
    ) -> pb.ListAttestationsResponse:
        principal = self._auth.require(context, Role.READER)
        items, token = await self._attestor.list_attestations(
            principal.read_scope,
            workflow_id=request.workflow_id,
            job_id=request.job_id,
            type=request.type,
            page_size=request.page_size,
            page_token=request.page_token,
            view=request.view,
            out=self._pages.encoder(
                lambda a: convert.attestation_to_proto(
                    a, full=request.view == pb.ATTESTATION_VIEW_FULL
                )
            ),
            more=convert.attestation_filter(request),
        )
        return pb.ListAttestationsResponse(attestations=items, next_page_token=token)

    @rpc
    async def VerifyAttestation(
        self, request: pb.VerifyAttestationRequest, context: Any
    ) -> pb.VerifyAttestationResponse:
        principal = self._auth.require(context, Role.READER)
        verdict = await self._attestor.verify(principal.read_scope, request.key)
        return pb.VerifyAttestationResponse(
            valid=verdict.valid,
            signature_valid=verdict.signature_valid,
            chain_valid=verdict.chain_valid,
            reason=verdict.reason,
            digest_valid=verdict.digest_valid,
            previous_pruned=verdict.previous_pruned,
            annotations_valid=verdict.annotations_valid,
            changed_annotation_ids=verdict.changed_annotation_ids,
            annotations_attested=verdict.annotations_attested,
        )

    @rpc
    async def GetSigningKeys(
        self, request: pb.GetSigningKeysRequest, context: Any
    ) -> pb.GetSigningKeysResponse:
        self._auth.require(context, Role.READER)
        keys = await self._attestor.keys()
        return pb.GetSigningKeysResponse(
            keys=[
                pb.SigningKey(
                    key_id=k.key_id,
                    public_key=k.public_key,
                    algorithm=k.algorithm,
                    create_time=convert.us_to_ts(k.created_us),
                    active=k.active,
                )
                for k in keys
            ]
        )

    @rpc
    async def AttachAnnotations(
        self, request: pb.AttachAnnotationsRequest, context: Any
    ) -> pb.AttachAnnotationsResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        item, payload_bytes = convert.annotation_input(
            request.actor,
            request.attributes,
            request.payload,
            request.HasField("payload"),
            request.idempotency_key,
        )
        stored = await self._annotations.attach(
            principal.read_scope,
            caller=Caller(principal.subject, principal.may(Role.REVIEWER)),
            run_id=request.run_id,
            job_id=request.job_id,
            attempt=request.attempt,
            scope=request.scope,
            scope_id=request.scope_id,
            item=item,
            payload_bytes=payload_bytes,
            emit_event=request.emit_event,
        )
        return pb.AttachAnnotationsResponse(
            annotations=[convert.annotation_to_proto(a) for a in stored]
        )

    @rpc
    async def ListAnnotations(
        self, request: pb.ListAnnotationsRequest, context: Any
    ) -> pb.ListAnnotationsResponse:
        principal = self._auth.require(context, Role.READER)
        items, token = await self._annotations.list(
            principal.read_scope,
            query=convert.annotation_filter(request),
            page_size=request.page_size,
            page_token=request.page_token,
            view=request.view,
            out=self._pages.encoder(
                lambda a: convert.annotation_to_proto(
                    a, full=request.view == pb.ANNOTATION_VIEW_FULL
                )
            ),
        )
        return pb.ListAnnotationsResponse(annotations=items, next_page_token=token)
