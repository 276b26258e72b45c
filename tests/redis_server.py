"""A real ``redis-server`` (Debian's package) for the tests (``specdec.launch.redis_server``).
Where the binary is missing the test is skipped with the reason, except in CI
(``.ci/run`` installs it), where that is a failure."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from specdec import launch


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A running redis-server; yields its URL."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed: apt-get install -y redis-server"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with launch.redis_server(folder) as url:
        yield url
