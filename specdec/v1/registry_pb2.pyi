from specdec.v1 import common_pb2 as _common_pb2
from specdec.v1 import gateway_pb2 as _gateway_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConnectRequest(_message.Message):
    __slots__ = ("register", "load", "commit", "finished", "failed", "opened")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    register: RegisterWorker
    load: WorkerLoad
    commit: AssignmentCommit
    finished: AssignmentFinished
    failed: AssignmentFailed
    opened: AssignmentOpened
    def __init__(self, register: _Optional[_Union[RegisterWorker, _Mapping]] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., commit: _Optional[_Union[AssignmentCommit, _Mapping]] = ..., finished: _Optional[_Union[AssignmentFinished, _Mapping]] = ..., failed: _Optional[_Union[AssignmentFailed, _Mapping]] = ..., opened: _Optional[_Union[AssignmentOpened, _Mapping]] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("registered", "assignment", "cancel", "release", "release_sessions")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    assignment: Assignment
    cancel: CancelAssignment
    release: ReleaseDraftSession
    release_sessions: ReleaseSessions
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., cancel: _Optional[_Union[CancelAssignment, _Mapping]] = ..., release: _Optional[_Union[ReleaseDraftSession, _Mapping]] = ..., release_sessions: _Optional[_Union[ReleaseSessions, _Mapping]] = ...) -> None: ...

class RegisterWorker(_message.Message):
    __slots__ = ("worker_id", "kind", "model", "vocab_fingerprint", "address", "max_sessions", "device", "vocab_size", "max_context", "eos_token_ids", "public_address", "cached_session_ids")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CACHED_SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    kind: _gateway_pb2.WorkerKind
    model: str
    vocab_fingerprint: str
    address: str
    max_sessions: int
    device: str
    vocab_size: int
    max_context: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    public_address: str
    cached_session_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., kind: _Optional[_Union[_gateway_pb2.WorkerKind, str]] = ..., model: _Optional[str] = ..., vocab_fingerprint: _Optional[str] = ..., address: _Optional[str] = ..., max_sessions: _Optional[int] = ..., device: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_context: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., public_address: _Optional[str] = ..., cached_session_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("load_interval_ms", "commit_key")
    LOAD_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_KEY_FIELD_NUMBER: _ClassVar[int]
    load_interval_ms: int
    commit_key: CommitKey
    def __init__(self, load_interval_ms: _Optional[int] = ..., commit_key: _Optional[_Union[CommitKey, _Mapping]] = ...) -> None: ...

class CommitKey(_message.Message):
    __slots__ = ("key_id", "secret")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    secret: bytes
    def __init__(self, key_id: _Optional[str] = ..., secret: _Optional[bytes] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("active_sessions", "kv_cache_bytes")
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    active_sessions: int
    kv_cache_bytes: int
    def __init__(self, active_sessions: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("assignment_id", "session_id", "oracle_id", "oracle_address", "token_ids", "prompt_tokens", "sampling", "seed", "num_speculative_tokens", "adaptive", "grant", "trace_context", "max_context", "pipeline_depth", "branches", "rescue", "commit")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ORACLE_ID_FIELD_NUMBER: _ClassVar[int]
    ORACLE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_SPECULATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    RESCUE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    session_id: str
    oracle_id: str
    oracle_address: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_tokens: int
    sampling: _common_pb2.SamplingParams
    seed: int
    num_speculative_tokens: int
    adaptive: bool
    grant: str
    trace_context: _containers.ScalarMap[str, str]
    max_context: int
    pipeline_depth: int
    branches: int
    rescue: bool
    commit: _common_pb2.CommitTicket
    def __init__(self, assignment_id: _Optional[str] = ..., session_id: _Optional[str] = ..., oracle_id: _Optional[str] = ..., oracle_address: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., prompt_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., num_speculative_tokens: _Optional[int] = ..., adaptive: _Optional[bool] = ..., grant: _Optional[str] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., max_context: _Optional[int] = ..., pipeline_depth: _Optional[int] = ..., branches: _Optional[int] = ..., rescue: _Optional[bool] = ..., commit: _Optional[_Union[_common_pb2.CommitTicket, _Mapping]] = ...) -> None: ...

class CancelAssignment(_message.Message):
    __slots__ = ("assignment_id", "reason")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    reason: str
    def __init__(self, assignment_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseDraftSession(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReleaseSessions(_message.Message):
    __slots__ = ("session_ids",)
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RoundReport(_message.Message):
    __slots__ = ("round", "proposed", "accepted", "is_bonus", "draft_ns", "verify_ns", "network_ns", "queue_ns", "drafted_ahead", "pipelined", "skipped_blocks", "branch", "rescued", "logprobs")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    IS_BONUS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_NS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_NS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_NS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_AHEAD_FIELD_NUMBER: _ClassVar[int]
    PIPELINED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    RESCUED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    round: int
    proposed: int
    accepted: int
    is_bonus: bool
    draft_ns: int
    verify_ns: int
    network_ns: int
    queue_ns: int
    drafted_ahead: bool
    pipelined: bool
    skipped_blocks: int
    branch: bool
    rescued: bool
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, round: _Optional[int] = ..., proposed: _Optional[int] = ..., accepted: _Optional[int] = ..., is_bonus: _Optional[bool] = ..., draft_ns: _Optional[int] = ..., verify_ns: _Optional[int] = ..., network_ns: _Optional[int] = ..., queue_ns: _Optional[int] = ..., drafted_ahead: _Optional[bool] = ..., pipelined: _Optional[bool] = ..., skipped_blocks: _Optional[int] = ..., branch: _Optional[bool] = ..., rescued: _Optional[bool] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class AssignmentOpened(_message.Message):
    __slots__ = ("assignment_id", "cached_tokens", "prefilled_tokens", "prefill_ns", "oracle_id")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NS_FIELD_NUMBER: _ClassVar[int]
    ORACLE_ID_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    cached_tokens: int
    prefilled_tokens: int
    prefill_ns: int
    oracle_id: str
    def __init__(self, assignment_id: _Optional[str] = ..., cached_tokens: _Optional[int] = ..., prefilled_tokens: _Optional[int] = ..., prefill_ns: _Optional[int] = ..., oracle_id: _Optional[str] = ...) -> None: ...

class AssignmentCommit(_message.Message):
    __slots__ = ("assignment_id", "base_length", "token_ids", "round", "proof")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    base_length: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    round: RoundReport
    proof: bytes
    def __init__(self, assignment_id: _Optional[str] = ..., base_length: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., round: _Optional[_Union[RoundReport, _Mapping]] = ..., proof: _Optional[bytes] = ...) -> None: ...

class AssignmentFinished(_message.Message):
    __slots__ = ("assignment_id", "finish_reason", "stats")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    finish_reason: _common_pb2.FinishReason
    stats: _common_pb2.GenerationStats
    def __init__(self, assignment_id: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., stats: _Optional[_Union[_common_pb2.GenerationStats, _Mapping]] = ...) -> None: ...

class AssignmentFailed(_message.Message):
    __slots__ = ("assignment_id", "status_code", "message")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    status_code: int
    message: str
    def __init__(self, assignment_id: _Optional[str] = ..., status_code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
