"""Rescue blocks, the loop's side (``specdec.core.rescue``), on plain data.

The oracle's side, and the whole exchange over real gRPC, are tested in
``tests/oracle_service/test_rescue.py`` and ``tests/system/test_services_e2e.py``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from specdec.core.ahead import Ahead
from specdec.core.rescue import adopt, skippable
from specdec.core.round import Sent, TurnState
from specdec.core.sampling import SamplingParams
from specdec.core.stopping import StopChecker
from specdec.core.types import DraftBlock, Rescue, RoundReport, Turn, VerifyResult
from specdec.engine.oracle import Oracle
from specdec.generate import LocalOracleLink
from tests.core.test_branches import FULL, drafted
from tests.core.test_pipeline import Skips, sent


def test_while_a_rescue_may_come_a_block_assumes_the_verdicts_last_token() -> None:
    # Sent after [1, 2, 7, 3], it claims to extend [1, 2, 7] + (3,): if the oracle
    # rescues, more is committed after 3 and the oracle skips it.
    assert skippable([1, 2, 7, 3]) == (3, (3,))


async def test_the_oracles_block_goes_first_and_only_its_outcomes_stay(
    loaded: Callable[..., Any],
) -> None:
    params = SamplingParams()
    turn = Turn([1, 2], 2, params, 0, 2, StopChecker(params, (), None), 64, draft_ahead=True)

    async def on_commit(tokens: list[int], report: RoundReport) -> None:
        pass

    skips = Skips()
    link = LocalOracleLink(Oracle(loaded("llama", "oracle")))
    state = TurnState(link, None, turn, on_commit, observer=skips)
    state.committed += [7, 3]  # a verdict no block sent fitted
    state.next_round = 10
    # In flight as the decision comes: the draft's own block for the verdict (assuming
    # its last token, see above), and blocks pipelined after that block's outcomes.
    own = sent(4, 3, (3,))
    hit = sent(5, 3, (3, 12, 13, 9))  # the oracle's block is (12, 13): both accepted, then 9
    corrected = sent(6, 3, (3, 12, 5))  # 12 accepted, 13 corrected to 5
    elsewhere = sent(7, 3, (3, 14, 1))  # the draft's block began with 14, the oracle's does not
    drafting = await drafted([FULL])
    ahead = Ahead(branches=drafting, drafted=3.0)
    result: asyncio.Future[VerifyResult] = asyncio.get_running_loop().create_future()
    rescue = Rescue(DraftBlock((12, 13)), result)

    in_flight, dropped = adopt(state, deque([own, hit, corrected, elsewhere]), ahead, rescue)
    head: Sent = in_flight[0]
    assert list(in_flight)[1:] == [hit, corrected] and dropped == 2
    assert skips.skipped == [4, 7]
    # The oracle's block is the head: after the committed tokens, its verdict on the way.
    assert head.round == 10 and head.origin.rescued and head.result is result
    assert (head.start, head.assumed, head.block.token_ids) == (4, (), (12, 13))
    # The drafting ahead restarts after the oracle's block; the guess it was for never
    # counts as failed.
    assert ahead.branches is None and drafting.ticket.cancelled and ahead.drafted == 2.0
