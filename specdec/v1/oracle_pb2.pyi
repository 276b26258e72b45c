from specdec.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VerifyRequest(_message.Message):
    __slots__ = ("open", "block", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OPEN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    open: OpenVerify
    block: VerifyBlock
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, open: _Optional[_Union[OpenVerify, _Mapping]] = ..., block: _Optional[_Union[VerifyBlock, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class OpenVerify(_message.Message):
    __slots__ = ("session_id", "token_ids", "sampling", "seed", "grant", "allow_rescue", "commit")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_RESCUE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    seed: int
    grant: str
    allow_rescue: bool
    commit: _common_pb2.CommitTicket
    def __init__(self, session_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., grant: _Optional[str] = ..., allow_rescue: _Optional[bool] = ..., commit: _Optional[_Union[_common_pb2.CommitTicket, _Mapping]] = ...) -> None: ...

class VerifyBlock(_message.Message):
    __slots__ = ("round", "base_length", "token_ids", "draft_distributions", "draft_ns", "assumed_token_ids", "last_alternative")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DISTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_NS_FIELD_NUMBER: _ClassVar[int]
    ASSUMED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LAST_ALTERNATIVE_FIELD_NUMBER: _ClassVar[int]
    round: int
    base_length: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_distributions: _containers.RepeatedCompositeFieldContainer[_common_pb2.SparseDistribution]
    draft_ns: int
    assumed_token_ids: _containers.RepeatedScalarFieldContainer[int]
    last_alternative: bool
    def __init__(self, round: _Optional[int] = ..., base_length: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., draft_distributions: _Optional[_Iterable[_Union[_common_pb2.SparseDistribution, _Mapping]]] = ..., draft_ns: _Optional[int] = ..., assumed_token_ids: _Optional[_Iterable[int]] = ..., last_alternative: _Optional[bool] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("opened", "verdict", "rescue")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    RESCUE_FIELD_NUMBER: _ClassVar[int]
    opened: VerifyOpened
    verdict: VerifyVerdict
    rescue: RescueDecision
    def __init__(self, opened: _Optional[_Union[VerifyOpened, _Mapping]] = ..., verdict: _Optional[_Union[VerifyVerdict, _Mapping]] = ..., rescue: _Optional[_Union[RescueDecision, _Mapping]] = ...) -> None: ...

class VerifyOpened(_message.Message):
    __slots__ = ("cached_tokens", "computed_tokens", "prefill_ns", "committed_length", "oracle_id")
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ORACLE_ID_FIELD_NUMBER: _ClassVar[int]
    cached_tokens: int
    computed_tokens: int
    prefill_ns: int
    committed_length: int
    oracle_id: str
    def __init__(self, cached_tokens: _Optional[int] = ..., computed_tokens: _Optional[int] = ..., prefill_ns: _Optional[int] = ..., committed_length: _Optional[int] = ..., oracle_id: _Optional[str] = ...) -> None: ...

class VerifyVerdict(_message.Message):
    __slots__ = ("round", "num_accepted", "next_token_id", "is_bonus", "committed_length", "verify_ns", "queue_ns", "skipped", "rescue_pending", "rescued", "proof", "logprobs")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    IS_BONUS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VERIFY_NS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    RESCUE_PENDING_FIELD_NUMBER: _ClassVar[int]
    RESCUED_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_accepted: int
    next_token_id: int
    is_bonus: bool
    committed_length: int
    verify_ns: int
    queue_ns: int
    skipped: bool
    rescue_pending: bool
    rescued: bool
    proof: bytes
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, round: _Optional[int] = ..., num_accepted: _Optional[int] = ..., next_token_id: _Optional[int] = ..., is_bonus: _Optional[bool] = ..., committed_length: _Optional[int] = ..., verify_ns: _Optional[int] = ..., queue_ns: _Optional[int] = ..., skipped: _Optional[bool] = ..., rescue_pending: _Optional[bool] = ..., rescued: _Optional[bool] = ..., proof: _Optional[bytes] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class RescueDecision(_message.Message):
    __slots__ = ("round", "token_ids")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("oracle_id", "model", "vocab_fingerprint", "vocab_size", "max_context", "eos_token_ids", "active_sessions", "cached_sessions", "kv_cache_bytes", "kv_cache_budget_bytes", "device", "batches", "verified_blocks", "verify_busy_ns", "rescue_draft", "rescue_blocks")
    ORACLE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_BUSY_NS_FIELD_NUMBER: _ClassVar[int]
    RESCUE_DRAFT_FIELD_NUMBER: _ClassVar[int]
    RESCUE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    oracle_id: str
    model: str
    vocab_fingerprint: str
    vocab_size: int
    max_context: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    active_sessions: int
    cached_sessions: int
    kv_cache_bytes: int
    kv_cache_budget_bytes: int
    device: str
    batches: int
    verified_blocks: int
    verify_busy_ns: int
    rescue_draft: str
    rescue_blocks: int
    def __init__(self, oracle_id: _Optional[str] = ..., model: _Optional[str] = ..., vocab_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_context: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., active_sessions: _Optional[int] = ..., cached_sessions: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., kv_cache_budget_bytes: _Optional[int] = ..., device: _Optional[str] = ..., batches: _Optional[int] = ..., verified_blocks: _Optional[int] = ..., verify_busy_ns: _Optional[int] = ..., rescue_draft: _Optional[str] = ..., rescue_blocks: _Optional[int] = ...) -> None: ...

class ReleaseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReleaseSessionResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
