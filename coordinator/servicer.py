"""gRPC servicers, thin: parse the request, call the coordinator's domain objects, pack the reply.

Handlers receive raw bytes and parse them here, so a message that does not parse is answered with
INVALID_ARGUMENT (grpc's own deserializer would answer INTERNAL); a domain error becomes the status
code it names, its reason the trailing metadata :mod:`omi.protos.refusals` reads. Oversized messages never get
this far: the server refuses them with RESOURCE_EXHAUSTED.
Every RPC reads what it needs of its context on the event loop and runs its domain call in the coordinator's
worker thread (``await self.c.call(...)``), so a slow call (a database round trip, opening a data source) never
holds up the loop, which also serves the dashboard.
"""

import hmac
import logging
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError
from omi.coordinator.core import Coordinator
from omi.coordinator.errors import CoordinatorError, Unauthenticated
from omi.protos import pb

logger = logging.getLogger(__name__)


def source_address(context: grpc.aio.ServicerContext) -> str:
    """The caller's IP address without its port ("ipv4:127.0.0.1:5555" -> "ipv4:127.0.0.1")."""
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class CoordinatorServicer:
    """The ``omi.v1.Coordinator`` service: volunteers, validators and the public."""

    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    async def GetChallenge(self, request: pb.GetChallengeRequest, context) -> pb.Challenge:
        return await self.c.call(self.c.registry.challenge, source_address(context))

    async def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        return await self.c.call(self.c.registry.register, request, source_address(context))

    async def RenewToken(self, request: pb.RenewTokenRequest, context) -> pb.AccessToken:
        return await self.c.call(self.c.registry.renew, request)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        return await self.c.call(lambda: self.c.heartbeat(self.c.registry.authenticate(request), request))

    async def GetRunSpec(self, request: pb.GetRunSpecRequest, context) -> pb.RunSpec:
        return await self.c.call(self.c.runs.spec_for_nodes, request.run_id)

    async def GetWork(self, request: pb.GetWorkRequest, context) -> pb.WorkAssignment:
        return await self.c.call(lambda: self.c.work.get_work(self.c.registry.authenticate(request), request.round,
                                                              source_address(context)))

    async def ReportContribution(self, request: pb.ReportContributionRequest,
                                 context) -> pb.ReportContributionResponse:
        contribution_id, audit_task_id = await self.c.call(
            lambda: self.c.ledger.report(self.c.registry.authenticate(request), request.contribution))
        return pb.ReportContributionResponse(contribution_id=contribution_id, accepted=True,
                                             audit_task_id=audit_task_id)

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveResponse:
        await self.c.call(lambda: self.c.leave(self.c.registry.authenticate(request)))
        return pb.LeaveResponse()

    async def GetAuditTask(self, request: pb.GetAuditTaskRequest, context) -> pb.AuditTask:
        return await self.c.call(lambda: self.c.auditor.next_task(self.c.registry.authenticate(request)))

    async def ReportAuditVerdict(self, request: pb.ReportAuditVerdictRequest,
                                 context) -> pb.ReportAuditVerdictResponse:
        await self.c.call(lambda: self.c.auditor.record_verdict(self.c.registry.authenticate(request),
                                                                request.verdict))
        return pb.ReportAuditVerdictResponse(accepted=True)

    async def SubmitAuditRecords(self, request: pb.SubmitAuditRecordsRequest,
                                 context) -> pb.SubmitAuditRecordsResponse:
        return await self.c.call(lambda: self.c.auditor.submit_records(self.c.registry.authenticate(request),
                                                                       request))

    async def ListRuns(self, request: pb.ListRunsRequest, context) -> pb.ListRunsResponse:
        return pb.ListRunsResponse(runs=await self.c.call(self.c.list_runs))

    async def GetRunStatus(self, request: pb.GetRunStatusRequest, context) -> pb.RunStatus:
        return await self.c.call(self.c.run_status, request.run_id)

    async def ListCheckpoints(self, request: pb.ListCheckpointsRequest, context) -> pb.ListCheckpointsResponse:
        return pb.ListCheckpointsResponse(checkpoints=await self.c.call(self.c.checkpoints.list, request.run_id))


class AdminServicer:
    """The ``omi.v1.Admin`` service; every call needs ``authorization: Bearer <admin token>`` metadata.

    :param coordinator: the domain objects
    :param admin_token: the token admin calls must carry
    :param run_started: called with a run id, on the event loop's thread, once a call left that run running
      (the server starts the run's swarm peer there)
    """

    def __init__(self, coordinator: Coordinator, admin_token: str, *,
                 run_started: Callable[[str], None] = lambda run_id: None):
        assert admin_token, "the admin token must not be empty"
        self.c = coordinator
        self._expected = f"Bearer {admin_token}".encode()
        self.run_started = run_started

    def authorize(self, context) -> None:
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not hmac.compare_digest(given.encode(), self._expected):
            raise Unauthenticated("admin RPCs need 'authorization: Bearer <admin token>' metadata")

    def _started(self, summary: pb.RunSummary) -> pb.RunSummary:
        if summary.state == pb.RUN_STATE_RUNNING:
            self.run_started(summary.run_id)
        return summary

    async def CreateRun(self, request: pb.CreateRunRequest, context) -> pb.RunSummary:
        return self._started(await self.c.call(self.c.runs.create, request.spec_toml, start=request.start))

    async def PauseRun(self, request: pb.RunRequest, context) -> pb.RunSummary:
        return await self.c.call(self.c.runs.transition, request.run_id, "pause")

    async def ResumeRun(self, request: pb.RunRequest, context) -> pb.RunSummary:
        return self._started(await self.c.call(self.c.runs.transition, request.run_id, "resume"))

    async def StopRun(self, request: pb.RunRequest, context) -> pb.RunSummary:
        return await self.c.call(self.c.runs.transition, request.run_id, "stop")

    async def BanNode(self, request: pb.BanNodeRequest, context) -> pb.BanNodeResponse:
        return pb.BanNodeResponse(changed=await self.c.call(self.c.registry.ban, request.node_id, request.reason))

    async def UnbanNode(self, request: pb.BanNodeRequest, context) -> pb.BanNodeResponse:
        return pb.BanNodeResponse(changed=await self.c.call(self.c.registry.unban, request.node_id))

    async def GrantValidator(self, request: pb.ValidatorRoleRequest, context) -> pb.ValidatorRoleResponse:
        return pb.ValidatorRoleResponse(changed=await self.c.call(self.c.auditor.grant, request.node_id,
                                                                  request.reason))

    async def RevokeValidator(self, request: pb.ValidatorRoleRequest, context) -> pb.ValidatorRoleResponse:
        return pb.ValidatorRoleResponse(changed=await self.c.call(self.c.auditor.revoke, request.node_id))

    async def ListValidators(self, request: pb.ListValidatorsRequest, context) -> pb.ListValidatorsResponse:
        grants = await self.c.call(self.c.auditor.validators)
        return pb.ListValidatorsResponse(validators=[pb.ValidatorGrant(node_id=n, reason=r, granted_at_ms=t)
                                                     for n, r, t in grants])


def _has_unknown_fields(message) -> bool:
    """Whether ``message`` (or a message inside it) carries fields its schema does not name."""
    known = type(message)()
    known.CopyFrom(message)
    known.DiscardUnknownFields()
    return known.ByteSize() != message.ByteSize()


def _unary(method: Callable, request_class, before: Callable | None = None) -> Callable:
    async def handler(data: bytes, context: grpc.aio.ServicerContext):
        try:
            request = request_class.FromString(data)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request_class.__name__}")
        if _has_unknown_fields(request):  # stored messages hold only what this coordinator reads, no padding
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{request_class.__name__} has fields this coordinator does not know")
        try:
            if before is not None:
                before(context)
            return await method(request, context)
        except CoordinatorError as e:
            await context.abort(grpc.StatusCode[e.code], str(e), trailing_metadata=e.trailing_metadata())
    return handler


def generic_handler(service_name: str, servicer, before: Callable | None = None) -> grpc.GenericRpcHandler:
    """A handler for every method of ``omi.v1.<service_name>``, implemented by the same-named servicer methods."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _unary(getattr(servicer, method.name), request_class, before),
            request_deserializer=None, response_serializer=response_class.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def add_services(server: grpc.aio.Server, coordinator: Coordinator, admin_token: str, *,
                 run_started: Callable[[str], None] = lambda run_id: None) -> list[str]:
    """Add both services to ``server``; returns their full names (for reflection and health).

    :param run_started: see :class:`AdminServicer`
    """
    admin = AdminServicer(coordinator, admin_token, run_started=run_started)
    server.add_generic_rpc_handlers((generic_handler("Coordinator", CoordinatorServicer(coordinator)),
                                     generic_handler("Admin", admin, before=admin.authorize)))
    return [pb.DESCRIPTOR.services_by_name[name].full_name for name in ("Coordinator", "Admin")]
