"""gRPC servicers, thin: parse the request, call the coordinator's domain objects, pack the reply.

Handlers receive raw bytes and parse them here, so a message that does not parse is answered with
INVALID_ARGUMENT (grpc's own deserializer would answer INTERNAL); a domain error becomes the status
code it names. Oversized messages never get this far: the server refuses them with RESOURCE_EXHAUSTED.
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

    def GetChallenge(self, request: pb.GetChallengeRequest, context) -> pb.Challenge:
        return self.c.registry.challenge(source_address(context))

    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        return self.c.registry.register(request, source_address(context))

    def RenewToken(self, request: pb.RenewTokenRequest, context) -> pb.AccessToken:
        return self.c.registry.renew(request)

    def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        return self.c.heartbeat(self.c.registry.authenticate(request), request)

    def GetRunSpec(self, request: pb.GetRunSpecRequest, context) -> pb.RunSpec:
        return self.c.runs.spec_for_nodes(request.run_id)

    def GetWork(self, request: pb.GetWorkRequest, context) -> pb.WorkAssignment:
        return self.c.work.get_work(self.c.registry.authenticate(request), request.epoch)

    def ReportContribution(self, request: pb.ReportContributionRequest, context) -> pb.ReportContributionResponse:
        contribution_id, audit_task_id = self.c.ledger.report(self.c.registry.authenticate(request),
                                                              request.contribution)
        return pb.ReportContributionResponse(contribution_id=contribution_id, accepted=True,
                                             audit_task_id=audit_task_id)

    def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveResponse:
        self.c.leave(self.c.registry.authenticate(request))
        return pb.LeaveResponse()

    def GetAuditTask(self, request: pb.GetAuditTaskRequest, context) -> pb.AuditTask:
        return self.c.auditor.next_task(self.c.registry.authenticate(request))

    def ReportAuditVerdict(self, request: pb.ReportAuditVerdictRequest, context) -> pb.ReportAuditVerdictResponse:
        self.c.auditor.record_verdict(self.c.registry.authenticate(request), request.verdict)
        return pb.ReportAuditVerdictResponse(accepted=True)

    def SubmitAuditRecords(self, request: pb.SubmitAuditRecordsRequest, context) -> pb.SubmitAuditRecordsResponse:
        return self.c.auditor.submit_records(self.c.registry.authenticate(request), request)

    def ListRuns(self, request: pb.ListRunsRequest, context) -> pb.ListRunsResponse:
        return pb.ListRunsResponse(runs=self.c.list_runs())

    def GetRunStatus(self, request: pb.GetRunStatusRequest, context) -> pb.RunStatus:
        return self.c.run_status(request.run_id)

    def ListCheckpoints(self, request: pb.ListCheckpointsRequest, context) -> pb.ListCheckpointsResponse:
        return pb.ListCheckpointsResponse(checkpoints=self.c.checkpoints.list(request.run_id))


class AdminServicer:
    """The ``omi.v1.Admin`` service; every call needs ``authorization: Bearer <admin token>`` metadata."""

    def __init__(self, coordinator: Coordinator, admin_token: str):
        assert admin_token, "the admin token must not be empty"
        self.c = coordinator
        self._expected = f"Bearer {admin_token}".encode()

    def authorize(self, context) -> None:
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not hmac.compare_digest(given.encode(), self._expected):
            raise Unauthenticated("admin RPCs need 'authorization: Bearer <admin token>' metadata")

    def CreateRun(self, request: pb.CreateRunRequest, context) -> pb.RunSummary:
        return self.c.runs.create(request.spec_toml, start=request.start)

    def PauseRun(self, request: pb.RunRequest, context) -> pb.RunSummary:
        return self.c.runs.transition(request.run_id, "pause")

    def ResumeRun(self, request: pb.RunRequest, context) -> pb.RunSummary:
        return self.c.runs.transition(request.run_id, "resume")

    def StopRun(self, request: pb.RunRequest, context) -> pb.RunSummary:
        return self.c.runs.transition(request.run_id, "stop")

    def BanNode(self, request: pb.BanNodeRequest, context) -> pb.BanNodeResponse:
        return pb.BanNodeResponse(changed=self.c.registry.ban(request.node_id, request.reason))

    def UnbanNode(self, request: pb.BanNodeRequest, context) -> pb.BanNodeResponse:
        return pb.BanNodeResponse(changed=self.c.registry.unban(request.node_id))


def _unary(method: Callable, request_class, before: Callable | None = None) -> Callable:
    async def handler(data: bytes, context: grpc.aio.ServicerContext):
        try:
            request = request_class.FromString(data)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request_class.__name__}")
        try:
            if before is not None:
                before(context)
            return method(request, context)
        except CoordinatorError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
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


def add_services(server: grpc.aio.Server, coordinator: Coordinator, admin_token: str) -> list[str]:
    """Add both services to ``server``; returns their full names (for reflection and health)."""
    admin = AdminServicer(coordinator, admin_token)
    server.add_generic_rpc_handlers((generic_handler("Coordinator", CoordinatorServicer(coordinator)),
                                     generic_handler("Admin", admin, before=admin.authorize)))
    return [pb.DESCRIPTOR.services_by_name[name].full_name for name in ("Coordinator", "Admin")]
