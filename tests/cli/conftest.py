"""Every CLI test gets its own copy of sys.path: the commands put the current folder on it (to import the user's
--model and --data factories from where they run), and that must not leak into later tests."""
import sys

import pytest


@pytest.fixture(autouse=True)
def _own_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
