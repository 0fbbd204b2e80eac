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
# One intra-op thread in this process and every child. The runs here are tiny, and the suite runs its multi-rank
# sessions and long runs in the background beside the tests (`_background`): OpenMP threads that spin-wait
# while other processes hold the cores cost more CPU than they save (on 2 cores, the whole suite at the default
# 2 threads against 1: 572 s of user time against 496, 354 s against 294 of wall-clock time).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # in case a plugin imported torch before this file set the variable


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished 2-step tiny run (16 px, `helpers.SMALL`) with step checkpoints 1 and 2, trained once for
    the whole session. Read it in place; a test that writes into a run takes `finished_run_copy`."""
    from helpers import tiny

    from daybreak.run import build_trainer

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    build_trainer(tiny(run_dir, "train.steps=2", "train.checkpoint_every=1"), progress=False).fit()
    return run_dir


@pytest.fixture
def finished_run_copy(finished_run, tmp_path):
    """This test's own copy of `finished_run`, free to resume, damage or extend."""
    return shutil.copytree(finished_run, tmp_path / "run")


def pytest_collection_modifyitems(items):
    """Tests that read background work (`gloo_ranks`, `background_run`) run after the rest, in their order:
    the work has had the whole session to finish instead of holding up the tests behind them."""
    late = [item for item in items if {"gloo_ranks", "background_run"} & set(getattr(item, "fixturenames", ()))]
    if late:
        ids = {id(item) for item in late}
        items[:] = [item for item in items if id(item) not in ids] + late


@pytest.fixture(scope="session", autouse=True)
def _background(request, tmp_path_factory):
    """Starts, as the session starts, the selected modules' multi-rank checks (`helpers.gloo_job`: one spawned
    gloo session per world size, one after the other) and long runs (`helpers.background_cli`): they run in the
    background while the tests, each on one thread, use the other core."""
    from helpers import BACKGROUND, GLOO_JOBS, BackgroundRun, GlooPool

    modules = {item.module.__name__ for item in request.session.items if getattr(item, "module", None)}
    wanted = any(job.fn.__module__ in modules for jobs in GLOO_JOBS.values() for job in jobs)
    pool = GlooPool(tmp_path_factory.mktemp("gloo"), modules) if wanted else None
    runs = {fn: BackgroundRun(tmp_path_factory.mktemp(fn.__name__), fn)
            for fn in BACKGROUND if fn.__module__ in modules}
    yield pool, runs
    for run in runs.values():
        run.close()
    if pool is not None:
        pool.close()


@pytest.fixture(scope="session")
def gloo_ranks(_background):
    """`gloo_ranks(job)` -> (the job's folder, what each rank returned), waiting for the pool to get there."""
    return _background[0].results


@pytest.fixture(scope="session")
def background_run(_background):
    """`background_run(fn)` -> (its folder, the command's seconds), waiting for it to finish."""
    return lambda fn: _background[1][fn].result()
