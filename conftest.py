"""Shared test fixtures: the corpora in ../shared/data, skipped when absent."""
import faulthandler
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.hookimpl(trylast=True)  # after pytest's own tmp_path plugin has set up its factory
def pytest_configure(config):
    """One thread for torch; Hypothesis keeps its example database under pytest's temporary directory."""
    try:
        import torch
    except ModuleNotFoundError:  # pytest from another Python than the project's environment
        pytest.exit(f"torch is not installed for {sys.executable}: set up the environment with the README's two "
                    f"commands, then run .venv/bin/python -m pytest", returncode=2)
    torch.set_num_threads(1)  # tiny models: a second thread costs more in contention than it gains
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and so in every process a test starts
    from hypothesis import settings
    from hypothesis.configuration import set_hypothesis_home_dir
    from hypothesis.database import DirectoryBasedExampleDatabase

    home = config._tmp_path_factory.getbasetemp() / "hypothesis"
    set_hypothesis_home_dir(home)  # its caches
    settings.register_profile("project", database=DirectoryBasedExampleDatabase(home / "examples"))
    settings.load_profile("project")


@pytest.fixture(autouse=True)
def fail_a_hung_test():
    """A test still running after 5 minutes ends the run, printing every thread's stack, instead of stalling CI."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def corpus(name):
    """Path to a shared corpus (the repo root copy first), or skip the test."""
    for path in (ROOT / name, SHARED_DATA / name):
        if path.is_file():
            return path
    pytest.skip(f"{name} not available (put it at the repo root or in ../shared/data)")


@pytest.fixture
def shakespeare():
    return corpus("tiny_shakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture
def aozora():
    return corpus("ja_aozora.txt").read_text(encoding="utf-8")


@pytest.fixture
def ctrl_c_at_batch(monkeypatch):
    """ctrl_c_at_batch(module, n): the module's `batch_stream` raises KeyboardInterrupt, as Ctrl-C would, when the
    n-th batch is drawn; returns a function that puts the real `batch_stream` back (for the resume)."""
    def arm(module, n):
        real, drawn = module.batch_stream, [0]

        def interrupting_stream(*args, **kwargs):
            next_batch = real(*args, **kwargs)

            def interrupting():
                drawn[0] += 1
                if drawn[0] == n:
                    raise KeyboardInterrupt
                return next_batch()
            return interrupting
        monkeypatch.setattr(module, "batch_stream", interrupting_stream)
        return lambda: monkeypatch.setattr(module, "batch_stream", real)
    return arm
