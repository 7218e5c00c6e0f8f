from __future__ import annotations

import pytest

from tests.processes import redis_url_or_skip


@pytest.fixture
def redis_url() -> str:
    return redis_url_or_skip()
