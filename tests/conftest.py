"""Fixtures shared by the unit and integration tests."""

import os
import shutil
import sys

# The suite starts ~40 Python processes (spawned gloo ranks, CLI and torchrun subprocesses), each of which
# imports torch and transformers. uv installs no bytecode (it leaves compilation to the first import), so
# where the environment sets PYTHONDONTWRITEBYTECODE every one of them compiles those packages from source
# again: ~10 s of CPU a process on this project's 2-core machines. Let this process and its children cache
# bytecode as Python does by default; the caches land in ignored `__pycache__` folders.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """The runs here are tiny; one intra-op thread avoids oversubscribing shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished 2-step tiny run (16 px, `helpers.SMALL`) with step checkpoints 1 and 2, trained once for
    the whole session. Read it in place; a test that writes into a run takes `finished_run_copy`."""
    from helpers import tiny

    from daybreak.run import build_trainer

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests' own runs (`one_thread` is function-scoped)
    try:
        build_trainer(tiny(run_dir, "train.steps=2", "train.checkpoint_every=1"), progress=False).fit()
    finally:
        torch.set_num_threads(before)
    return run_dir


@pytest.fixture
def finished_run_copy(finished_run, tmp_path):
    """This test's own copy of `finished_run`, free to resume, damage or extend."""
    return shutil.copytree(finished_run, tmp_path / "run")
