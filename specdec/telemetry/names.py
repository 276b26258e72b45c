"""Names of the spans, attributes and span events specdec emits (one place, one spelling).

Request attributes follow the OpenTelemetry GenAI semantic conventions where
one applies (``gen_ai.*``); everything specific to speculative decoding is
under ``specdec.*``. Durations are integer nanoseconds (``*_ns``), as measured.
"""

from __future__ import annotations

# -- spans -------------------------------------------------------------------
ROUND_SPAN = "specdec.round"  # one draft -> verify round, where the round runs
DRAFT_SPAN = "specdec.draft"  # the drafter's proposal, under its round
VERIFY_SPAN = "specdec.verify"  # the oracle's verification of a block, under its round
PREFILL_SPAN = "specdec.prefill"  # the oracle's OpenVerify (KV cache brought to the context)
TURN_SPAN = "specdec.turn"  # only when a draft gets no trace context: groups its rounds

# -- services (OTEL_SERVICE_NAME overrides) ----------------------------------
SERVICE_NAMES = {
    "gateway": "specdec-gateway",
    "oracle": "specdec-oracle",
    "draft": "specdec-draft",
}

# -- GenAI semantic conventions (request span) -------------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_REQUEST_STOP_SEQUENCES = "gen_ai.request.stop_sequences"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
OPERATION_TEXT_COMPLETION = "text_completion"
OPERATION_CHAT = "chat"
PROVIDER = "specdec"

# -- specdec request attributes ----------------------------------------------
SESSION_ID = "specdec.session.id"
REQUEST_K = "specdec.request.k"
DRAFTER = "specdec.drafter"  # model | ngram | none
ORACLE_ID = "specdec.oracle.id"
DRAFT_ID = "specdec.draft.id"
ROUNDS = "specdec.rounds"
PROPOSED_TOKENS = "specdec.tokens.proposed"
ACCEPTED_TOKENS = "specdec.tokens.accepted"
ACCEPTANCE_RATE = "specdec.acceptance_rate"  # accepted / proposed
MEAN_ACCEPTED_LENGTH = "specdec.mean_accepted_length"  # accepted draft tokens per round
MEAN_TOKENS_PER_ROUND = "specdec.mean_tokens_per_round"  # (accepted + rounds) / rounds
CACHED_TOKENS = "specdec.prefill.cached_tokens"
COMPUTED_TOKENS = "specdec.prefill.computed_tokens"
PREFILL_NS = "specdec.prefill.ns"
TIME_TO_FIRST_TOKEN_NS = "specdec.time_to_first_token_ns"
FAILOVERS = "specdec.failovers"

# -- round attributes (round span; the verify span carries the oracle's subset) --
ROUND_INDEX = "specdec.round.index"
ROUND_K = "specdec.round.k"  # tokens asked of the drafter (the block size at the oracle)
ROUND_PROPOSED = "specdec.round.proposed_tokens"
ROUND_ACCEPTED = "specdec.round.accepted_tokens"
ROUND_EXTRA_TOKEN = "specdec.round.extra_token"  # "bonus" (all accepted) or "correction"
ROUND_COMMITTED = "specdec.round.committed_tokens"  # added to the output (after stop cut)
ROUND_COMMITTED_LENGTH = "specdec.round.committed_length"  # sequence length after the round
ROUND_DRAFT_NS = "specdec.round.draft_ns"
ROUND_VERIFY_NS = "specdec.round.verify_ns"
ROUND_NETWORK_NS = "specdec.round.network_ns"  # round trip - verify - queue
ROUND_QUEUE_NS = "specdec.round.queue_ns"  # waiting for the oracle's model thread
ROUND_WALL_NS = "specdec.round.wall_ns"  # since the previous verdict (round 0: the open)
ROUND_PIPELINED = "specdec.round.pipelined"  # sent before the previous verdict came back
ROUND_BLOCK = "specdec.round.block"  # how it was drafted: RoundReport.block_origin
ROUND_SKIPPED = "specdec.round.skipped"  # a pipelined block that proved stale: not verified
BONUS, CORRECTION = "bonus", "correction"

# -- KV cache events (on prefill / verify spans) -----------------------------
EVENT_PREFILL = "specdec.kv.prefill"  # attributes: cached_tokens, computed_tokens
EVENT_REPREFILL = "specdec.kv.re_prefill"  # the session's cache had been evicted: tokens
EVENT_ROLLBACK = "specdec.kv.rollback"  # rejected draft tokens dropped from the cache: tokens
EVENT_EVICTION = "specdec.kv.eviction"  # idle sessions evicted meanwhile: sessions
