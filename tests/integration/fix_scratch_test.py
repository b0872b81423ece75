import pytest
from proxy.session import ClientSession
from tests.integration import test_robustness as R
from tests.integration.test_robustness import *  # noqa

@pytest.fixture()
def nobp(monkeypatch):
    monkeypatch.setattr(ClientSession, "pause_writing", lambda self: None)

async def test_without_backpressure(nobp, proxy):
    await R.test_million_rows_slow_reader_bounded_memory.__wrapped__(proxy) if hasattr(R.test_million_rows_slow_reader_bounded_memory, "__wrapped__") else await R.test_million_rows_slow_reader_bounded_memory(proxy)
