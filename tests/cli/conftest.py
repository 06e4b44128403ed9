"""Every CLI test gets its own sys.path: the commands put the current folder on it (to import the user's
--model and --data factories from where they run), and that must not leak into later tests."""
import sys

import pytest


@pytest.fixture(autouse=True)
def _own_sys_path():
    """Restored in place, after the test's own monkeypatch (set up later, torn down first) has undone its changes."""
    saved = sys.path[:]
    yield
    sys.path[:] = saved
