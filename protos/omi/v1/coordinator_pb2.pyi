from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_CREATED: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_PAUSED: _ClassVar[RunState]
    RUN_STATE_STOPPED: _ClassVar[RunState]

class Refusal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUSAL_UNSPECIFIED: _ClassVar[Refusal]
    REFUSAL_RUN_STOPPED: _ClassVar[Refusal]
    REFUSAL_RUN_ENDED: _ClassVar[Refusal]
    REFUSAL_RUN_NOT_RUNNING: _ClassVar[Refusal]
    REFUSAL_BANNED: _ClassVar[Refusal]
    REFUSAL_UNKNOWN_RUN: _ClassVar[Refusal]
    REFUSAL_TOKEN_EXPIRED: _ClassVar[Refusal]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_CREATED: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_PAUSED: RunState
RUN_STATE_STOPPED: RunState
REFUSAL_UNSPECIFIED: Refusal
REFUSAL_RUN_STOPPED: Refusal
REFUSAL_RUN_ENDED: Refusal
REFUSAL_RUN_NOT_RUNNING: Refusal
REFUSAL_BANNED: Refusal
REFUSAL_UNKNOWN_RUN: Refusal
REFUSAL_TOKEN_EXPIRED: Refusal

class DataSpec(_message.Message):
    __slots__ = ("source", "shard_size", "resolution")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SHARD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    source: str
    shard_size: int
    resolution: int
    def __init__(self, source: _Optional[str] = ..., shard_size: _Optional[int] = ..., resolution: _Optional[int] = ...) -> None: ...

class TrainingSpec(_message.Message):
    __slots__ = ("micro_batch_size", "learning_rate", "weight_decay", "prediction_type", "num_train_timesteps", "max_rounds", "shards_per_assignment", "seed", "max_grad_norm")
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_PER_ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    micro_batch_size: int
    learning_rate: float
    weight_decay: float
    prediction_type: str
    num_train_timesteps: int
    max_rounds: int
    shards_per_assignment: int
    seed: int
    max_grad_norm: float
    def __init__(self, micro_batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., prediction_type: _Optional[str] = ..., num_train_timesteps: _Optional[int] = ..., max_rounds: _Optional[int] = ..., shards_per_assignment: _Optional[int] = ..., seed: _Optional[int] = ..., max_grad_norm: _Optional[float] = ...) -> None: ...

class AveragingSpec(_message.Message):
    __slots__ = ("matchmaking_time", "averaging_timeout", "reducer", "clip_tau", "clip_iterations")
    MATCHMAKING_TIME_FIELD_NUMBER: _ClassVar[int]
    AVERAGING_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    REDUCER_FIELD_NUMBER: _ClassVar[int]
    CLIP_TAU_FIELD_NUMBER: _ClassVar[int]
    CLIP_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    matchmaking_time: float
    averaging_timeout: float
    reducer: str
    clip_tau: float
    clip_iterations: int
    def __init__(self, matchmaking_time: _Optional[float] = ..., averaging_timeout: _Optional[float] = ..., reducer: _Optional[str] = ..., clip_tau: _Optional[float] = ..., clip_iterations: _Optional[int] = ...) -> None: ...

class RoundsSpec(_message.Message):
    __slots__ = ("inner_steps", "outer_learning_rate", "outer_momentum", "outer_nesterov", "overlap", "compression", "topk_density", "max_round_seconds")
    INNER_STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTER_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    OUTER_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    OUTER_NESTEROV_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    TOPK_DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    inner_steps: int
    outer_learning_rate: float
    outer_momentum: float
    outer_nesterov: bool
    overlap: bool
    compression: str
    topk_density: float
    max_round_seconds: float
    def __init__(self, inner_steps: _Optional[int] = ..., outer_learning_rate: _Optional[float] = ..., outer_momentum: _Optional[float] = ..., outer_nesterov: _Optional[bool] = ..., overlap: _Optional[bool] = ..., compression: _Optional[str] = ..., topk_density: _Optional[float] = ..., max_round_seconds: _Optional[float] = ...) -> None: ...

class VerificationSpec(_message.Message):
    __slots__ = ("audit_rate", "max_strikes", "audit_window_rounds", "sketch_size", "segment_steps")
    AUDIT_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_STRIKES_FIELD_NUMBER: _ClassVar[int]
    AUDIT_WINDOW_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SKETCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_STEPS_FIELD_NUMBER: _ClassVar[int]
    audit_rate: float
    max_strikes: int
    audit_window_rounds: int
    sketch_size: int
    segment_steps: int
    def __init__(self, audit_rate: _Optional[float] = ..., max_strikes: _Optional[int] = ..., audit_window_rounds: _Optional[int] = ..., sketch_size: _Optional[int] = ..., segment_steps: _Optional[int] = ...) -> None: ...

class CheckpointSpec(_message.Message):
    __slots__ = ("every_rounds", "keep", "milestone_every", "preview_samples")
    EVERY_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    MILESTONE_EVERY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    every_rounds: int
    keep: int
    milestone_every: int
    preview_samples: int
    def __init__(self, every_rounds: _Optional[int] = ..., keep: _Optional[int] = ..., milestone_every: _Optional[int] = ..., preview_samples: _Optional[int] = ...) -> None: ...

class LivenessSpec(_message.Message):
    __slots__ = ("heartbeat_interval", "heartbeat_timeout", "token_ttl")
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TTL_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval: float
    heartbeat_timeout: float
    token_ttl: float
    def __init__(self, heartbeat_interval: _Optional[float] = ..., heartbeat_timeout: _Optional[float] = ..., token_ttl: _Optional[float] = ...) -> None: ...

class RunSpec(_message.Message):
    __slots__ = ("run_id", "name", "description", "model", "data", "training", "averaging", "verification", "checkpoints", "liveness", "coordinator_public_key", "initial_peers", "dht_prefix", "rounds", "witnessed")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    AVERAGING_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    DHT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    WITNESSED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    description: str
    model: str
    data: DataSpec
    training: TrainingSpec
    averaging: AveragingSpec
    verification: VerificationSpec
    checkpoints: CheckpointSpec
    liveness: LivenessSpec
    coordinator_public_key: bytes
    initial_peers: _containers.RepeatedScalarFieldContainer[str]
    dht_prefix: str
    rounds: RoundsSpec
    witnessed: bool
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., model: _Optional[str] = ..., data: _Optional[_Union[DataSpec, _Mapping]] = ..., training: _Optional[_Union[TrainingSpec, _Mapping]] = ..., averaging: _Optional[_Union[AveragingSpec, _Mapping]] = ..., verification: _Optional[_Union[VerificationSpec, _Mapping]] = ..., checkpoints: _Optional[_Union[CheckpointSpec, _Mapping]] = ..., liveness: _Optional[_Union[LivenessSpec, _Mapping]] = ..., coordinator_public_key: _Optional[bytes] = ..., initial_peers: _Optional[_Iterable[str]] = ..., dht_prefix: _Optional[str] = ..., rounds: _Optional[_Union[RoundsSpec, _Mapping]] = ..., witnessed: _Optional[bool] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("run_id", "name", "model", "state", "round", "total_samples", "volunteers_online", "created_at_ms")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    VOLUNTEERS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    model: str
    state: RunState
    round: int
    total_samples: int
    volunteers_online: int
    created_at_ms: int
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., model: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., round: _Optional[int] = ..., total_samples: _Optional[int] = ..., volunteers_online: _Optional[int] = ..., created_at_ms: _Optional[int] = ...) -> None: ...

class Challenge(_message.Message):
    __slots__ = ("nonce", "expires_at_ms")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    expires_at_ms: int
    def __init__(self, nonce: _Optional[bytes] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class GetChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("public_key", "nonce", "run_id", "peer_id", "display_name", "swarm_public_key", "peer_public_key", "peer_signature", "signature")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SWARM_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PEER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PEER_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    nonce: bytes
    run_id: str
    peer_id: str
    display_name: str
    swarm_public_key: bytes
    peer_public_key: bytes
    peer_signature: bytes
    signature: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., display_name: _Optional[str] = ..., swarm_public_key: _Optional[bytes] = ..., peer_public_key: _Optional[bytes] = ..., peer_signature: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AccessToken(_message.Message):
    __slots__ = ("node_id", "peer_id", "run_id", "issued_at_ms", "expires_at_ms", "node_public_key", "swarm_public_key", "signature")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SWARM_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    peer_id: str
    run_id: str
    issued_at_ms: int
    expires_at_ms: int
    node_public_key: bytes
    swarm_public_key: bytes
    signature: bytes
    def __init__(self, node_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., run_id: _Optional[str] = ..., issued_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., node_public_key: _Optional[bytes] = ..., swarm_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("node_id", "token", "run_spec")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUN_SPEC_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    token: AccessToken
    run_spec: RunSpec
    def __init__(self, node_id: _Optional[str] = ..., token: _Optional[_Union[AccessToken, _Mapping]] = ..., run_spec: _Optional[_Union[RunSpec, _Mapping]] = ...) -> None: ...

class RenewTokenRequest(_message.Message):
    __slots__ = ("token", "timestamp_ms", "nonce", "signature")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    token: AccessToken
    timestamp_ms: int
    nonce: bytes
    signature: bytes
    def __init__(self, token: _Optional[_Union[AccessToken, _Mapping]] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("token", "timestamp_ms", "round", "samples_per_second", "swarm_peers", "loss", "nonce", "signature")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    SWARM_PEERS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    token: AccessToken
    timestamp_ms: int
    round: int
    samples_per_second: float
    swarm_peers: int
    loss: float
    nonce: bytes
    signature: bytes
    def __init__(self, token: _Optional[_Union[AccessToken, _Mapping]] = ..., timestamp_ms: _Optional[int] = ..., round: _Optional[int] = ..., samples_per_second: _Optional[float] = ..., swarm_peers: _Optional[int] = ..., loss: _Optional[float] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("run_state", "round", "token_expires_at_ms")
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKEN_EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    run_state: RunState
    round: int
    token_expires_at_ms: int
    def __init__(self, run_state: _Optional[_Union[RunState, str]] = ..., round: _Optional[int] = ..., token_expires_at_ms: _Optional[int] = ...) -> None: ...

class GetRunSpecRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetWorkRequest(_message.Message):
    __slots__ = ("token", "timestamp_ms", "round", "nonce", "signature")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    token: AccessToken
    timestamp_ms: int
    round: int
    nonce: bytes
    signature: bytes
    def __init__(self, token: _Optional[_Union[AccessToken, _Mapping]] = ..., timestamp_ms: _Optional[int] = ..., round: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ShardRange(_message.Message):
    __slots__ = ("shard_id", "start", "end")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    start: int
    end: int
    def __init__(self, shard_id: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class WorkAssignment(_message.Message):
    __slots__ = ("assignment_id", "run_id", "round", "node_id", "shards", "seed", "micro_batch_size", "run_state", "state_hash", "signature")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    run_id: str
    round: int
    node_id: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardRange]
    seed: int
    micro_batch_size: int
    run_state: RunState
    state_hash: str
    signature: bytes
    def __init__(self, assignment_id: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., node_id: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardRange, _Mapping]]] = ..., seed: _Optional[int] = ..., micro_batch_size: _Optional[int] = ..., run_state: _Optional[_Union[RunState, str]] = ..., state_hash: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Contribution(_message.Message):
    __slots__ = ("run_id", "node_id", "round", "assignment_id", "samples", "mean_loss", "compute_seconds", "params_hash", "commitment", "micro_batches", "gradient_sketch", "created_at_ms", "delta_sketch", "bytes_sent", "end_params_hash", "segment_hashes", "signature")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_HASH_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_SKETCH_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DELTA_SKETCH_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    END_PARAMS_HASH_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_HASHES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node_id: str
    round: int
    assignment_id: str
    samples: int
    mean_loss: float
    compute_seconds: float
    params_hash: bytes
    commitment: bytes
    micro_batches: int
    gradient_sketch: _containers.RepeatedScalarFieldContainer[float]
    created_at_ms: int
    delta_sketch: _containers.RepeatedScalarFieldContainer[float]
    bytes_sent: int
    end_params_hash: bytes
    segment_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    signature: bytes
    def __init__(self, run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., round: _Optional[int] = ..., assignment_id: _Optional[str] = ..., samples: _Optional[int] = ..., mean_loss: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., params_hash: _Optional[bytes] = ..., commitment: _Optional[bytes] = ..., micro_batches: _Optional[int] = ..., gradient_sketch: _Optional[_Iterable[float]] = ..., created_at_ms: _Optional[int] = ..., delta_sketch: _Optional[_Iterable[float]] = ..., bytes_sent: _Optional[int] = ..., end_params_hash: _Optional[bytes] = ..., segment_hashes: _Optional[_Iterable[bytes]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ReportContributionRequest(_message.Message):
    __slots__ = ("token", "timestamp_ms", "contribution", "nonce", "signature")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    token: AccessToken
    timestamp_ms: int
    contribution: Contribution
    nonce: bytes
    signature: bytes
    def __init__(self, token: _Optional[_Union[AccessToken, _Mapping]] = ..., timestamp_ms: _Optional[int] = ..., contribution: _Optional[_Union[Contribution, _Mapping]] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ReportContributionResponse(_message.Message):
    __slots__ = ("contribution_id", "accepted", "audit_task_id")
    CONTRIBUTION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    AUDIT_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    contribution_id: str
    accepted: bool
    audit_task_id: str
    def __init__(self, contribution_id: _Optional[str] = ..., accepted: _Optional[bool] = ..., audit_task_id: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("token", "timestamp_ms", "nonce", "signature")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    token: AccessToken
    timestamp_ms: int
    nonce: bytes
    signature: bytes
    def __init__(self, token: _Optional[_Union[AccessToken, _Mapping]] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetAuditTaskRequest(_message.Message):
    __slots__ = ("token", "timestamp_ms", "nonce", "signature")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    token: AccessToken
    timestamp_ms: int
    nonce: bytes
    signature: bytes
    def __init__(self, token: _Optional[_Union[AccessToken, _Mapping]] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AuditTask(_message.Message):
    __slots__ = ("task_id", "run_id", "contribution_id", "node_id", "round", "params_hash", "assignment", "micro_batch_indices", "audit_seed", "has_task", "records", "commitment", "micro_batches", "peer_id", "segment_hashes", "delta_sketch")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_HASH_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_INDICES_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEED_FIELD_NUMBER: _ClassVar[int]
    HAS_TASK_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_HASHES_FIELD_NUMBER: _ClassVar[int]
    DELTA_SKETCH_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    run_id: str
    contribution_id: str
    node_id: str
    round: int
    params_hash: bytes
    assignment: WorkAssignment
    micro_batch_indices: _containers.RepeatedScalarFieldContainer[int]
    audit_seed: int
    has_task: bool
    records: _containers.RepeatedCompositeFieldContainer[AuditedRecord]
    commitment: bytes
    micro_batches: int
    peer_id: str
    segment_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    delta_sketch: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, task_id: _Optional[str] = ..., run_id: _Optional[str] = ..., contribution_id: _Optional[str] = ..., node_id: _Optional[str] = ..., round: _Optional[int] = ..., params_hash: _Optional[bytes] = ..., assignment: _Optional[_Union[WorkAssignment, _Mapping]] = ..., micro_batch_indices: _Optional[_Iterable[int]] = ..., audit_seed: _Optional[int] = ..., has_task: _Optional[bool] = ..., records: _Optional[_Iterable[_Union[AuditedRecord, _Mapping]]] = ..., commitment: _Optional[bytes] = ..., micro_batches: _Optional[int] = ..., peer_id: _Optional[str] = ..., segment_hashes: _Optional[_Iterable[bytes]] = ..., delta_sketch: _Optional[_Iterable[float]] = ...) -> None: ...

class MicroBatchCheck(_message.Message):
    __slots__ = ("index", "loss_diff", "norm_diff", "sketch_diff", "passed")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOSS_DIFF_FIELD_NUMBER: _ClassVar[int]
    NORM_DIFF_FIELD_NUMBER: _ClassVar[int]
    SKETCH_DIFF_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    index: int
    loss_diff: float
    norm_diff: float
    sketch_diff: float
    passed: bool
    def __init__(self, index: _Optional[int] = ..., loss_diff: _Optional[float] = ..., norm_diff: _Optional[float] = ..., sketch_diff: _Optional[float] = ..., passed: _Optional[bool] = ...) -> None: ...

class AuditVerdict(_message.Message):
    __slots__ = ("task_id", "validator_node_id", "passed", "checks", "reason", "created_at_ms", "signature", "params_hash", "exact_params", "recompute_seconds", "params_from_node", "params_distance")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATOR_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_HASH_FIELD_NUMBER: _ClassVar[int]
    EXACT_PARAMS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    validator_node_id: str
    passed: bool
    checks: _containers.RepeatedCompositeFieldContainer[MicroBatchCheck]
    reason: str
    created_at_ms: int
    signature: bytes
    params_hash: bytes
    exact_params: bool
    recompute_seconds: float
    params_from_node: bool
    params_distance: float
    def __init__(self, task_id: _Optional[str] = ..., validator_node_id: _Optional[str] = ..., passed: _Optional[bool] = ..., checks: _Optional[_Iterable[_Union[MicroBatchCheck, _Mapping]]] = ..., reason: _Optional[str] = ..., created_at_ms: _Optional[int] = ..., signature: _Optional[bytes] = ..., params_hash: _Optional[bytes] = ..., exact_params: _Optional[bool] = ..., recompute_seconds: _Optional[float] = ..., params_from_node: _Optional[bool] = ..., params_distance: _Optional[float] = ...) -> None: ...

class ParamsRequest(_message.Message):
    __slots__ = ("params_hash",)
    PARAMS_HASH_FIELD_NUMBER: _ClassVar[int]
    params_hash: bytes
    def __init__(self, params_hash: _Optional[bytes] = ...) -> None: ...

class ParamsChunk(_message.Message):
    __slots__ = ("data", "total_bytes", "error")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_bytes: int
    error: str
    def __init__(self, data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class MicroBatchRecord(_message.Message):
    __slots__ = ("index", "samples", "loss", "grad_norm", "sketch")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    SKETCH_FIELD_NUMBER: _ClassVar[int]
    index: int
    samples: int
    loss: float
    grad_norm: float
    sketch: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, index: _Optional[int] = ..., samples: _Optional[int] = ..., loss: _Optional[float] = ..., grad_norm: _Optional[float] = ..., sketch: _Optional[_Iterable[float]] = ...) -> None: ...

class AuditedRecord(_message.Message):
    __slots__ = ("record", "proof_hashes", "proof_sides", "leaves")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    PROOF_HASHES_FIELD_NUMBER: _ClassVar[int]
    PROOF_SIDES_FIELD_NUMBER: _ClassVar[int]
    LEAVES_FIELD_NUMBER: _ClassVar[int]
    record: MicroBatchRecord
    proof_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    proof_sides: str
    leaves: int
    def __init__(self, record: _Optional[_Union[MicroBatchRecord, _Mapping]] = ..., proof_hashes: _Optional[_Iterable[bytes]] = ..., proof_sides: _Optional[str] = ..., leaves: _Optional[int] = ...) -> None: ...

class SubmitAuditRecordsRequest(_message.Message):
    __slots__ = ("token", "timestamp_ms", "task_id", "records", "nonce", "signature")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    token: AccessToken
    timestamp_ms: int
    task_id: str
    records: _containers.RepeatedCompositeFieldContainer[MicroBatchRecord]
    nonce: bytes
    signature: bytes
    def __init__(self, token: _Optional[_Union[AccessToken, _Mapping]] = ..., timestamp_ms: _Optional[int] = ..., task_id: _Optional[str] = ..., records: _Optional[_Iterable[_Union[MicroBatchRecord, _Mapping]]] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SubmitAuditRecordsResponse(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportAuditVerdictRequest(_message.Message):
    __slots__ = ("token", "timestamp_ms", "verdict", "nonce", "signature")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    token: AccessToken
    timestamp_ms: int
    verdict: AuditVerdict
    nonce: bytes
    signature: bytes
    def __init__(self, token: _Optional[_Union[AccessToken, _Mapping]] = ..., timestamp_ms: _Optional[int] = ..., verdict: _Optional[_Union[AuditVerdict, _Mapping]] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ReportAuditVerdictResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunSummary]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunSummary, _Mapping]]] = ...) -> None: ...

class GetRunStatusRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class RunStatus(_message.Message):
    __slots__ = ("summary", "samples_per_second", "last_loss", "contributions", "verified_samples", "provisional_samples")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROVISIONAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    summary: RunSummary
    samples_per_second: float
    last_loss: float
    contributions: int
    verified_samples: int
    provisional_samples: int
    def __init__(self, summary: _Optional[_Union[RunSummary, _Mapping]] = ..., samples_per_second: _Optional[float] = ..., last_loss: _Optional[float] = ..., contributions: _Optional[int] = ..., verified_samples: _Optional[int] = ..., provisional_samples: _Optional[int] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("run_id", "round", "total_samples", "manifest_sha256", "size_bytes", "created_at_ms", "path", "milestone", "url")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MILESTONE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    total_samples: int
    manifest_sha256: str
    size_bytes: int
    created_at_ms: int
    path: str
    milestone: bool
    url: str
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., total_samples: _Optional[int] = ..., manifest_sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., created_at_ms: _Optional[int] = ..., path: _Optional[str] = ..., milestone: _Optional[bool] = ..., url: _Optional[str] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[Checkpoint]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[Checkpoint, _Mapping]]] = ...) -> None: ...

class CreateRunRequest(_message.Message):
    __slots__ = ("spec_toml", "start")
    SPEC_TOML_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    spec_toml: str
    start: bool
    def __init__(self, spec_toml: _Optional[str] = ..., start: _Optional[bool] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class BanNodeRequest(_message.Message):
    __slots__ = ("node_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class BanNodeResponse(_message.Message):
    __slots__ = ("changed",)
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    def __init__(self, changed: _Optional[bool] = ...) -> None: ...

class ValidatorRoleRequest(_message.Message):
    __slots__ = ("node_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ValidatorRoleResponse(_message.Message):
    __slots__ = ("changed",)
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    def __init__(self, changed: _Optional[bool] = ...) -> None: ...

class ListValidatorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ValidatorGrant(_message.Message):
    __slots__ = ("node_id", "reason", "granted_at_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GRANTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    granted_at_ms: int
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ..., granted_at_ms: _Optional[int] = ...) -> None: ...

class ListValidatorsResponse(_message.Message):
    __slots__ = ("validators",)
    VALIDATORS_FIELD_NUMBER: _ClassVar[int]
    validators: _containers.RepeatedCompositeFieldContainer[ValidatorGrant]
    def __init__(self, validators: _Optional[_Iterable[_Union[ValidatorGrant, _Mapping]]] = ...) -> None: ...

class RefusalDetail(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: Refusal
    def __init__(self, reason: _Optional[_Union[Refusal, str]] = ...) -> None: ...
