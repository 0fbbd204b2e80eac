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


@pytest.fixture(scope="session")
def gloo_ranks(request, tmp_path_factory):
    """`gloo_ranks(job)` -> (the job's folder, what each rank returned): the `helpers.gloo_job` checks of the
    selected test modules, all run in one spawned gloo session per world size (spawned on first use)."""
    import json
    import time

    import torch.multiprocessing as mp
    from helpers import GLOO_JOBS, free_port, gloo_rank, job_name

    modules = {item.module.__name__ for item in request.session.items if getattr(item, "module", None)}
    done: dict[int, object] = {}

    def session(world: int):
        jobs = [(fn, prep, t) for fn, prep, t in GLOO_JOBS[world] if fn.__module__ in modules]
        root = tmp_path_factory.mktemp(f"gloo{world}")
        for fn, prepare, _ in jobs:
            (root / job_name(fn)).mkdir()
            if prepare is not None:
                prepare(root / job_name(fn))
        timeout = sum(t for _, _, t in jobs)
        ctx = mp.spawn(gloo_rank, args=(free_port(), world, str(root), [fn for fn, _, _ in jobs]), nprocs=world,
                       join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"{world} ranks did not finish {len(jobs)} jobs within {timeout:.0f} s (a hang)")
        return root

    def results(job):
        world = next(w for w, jobs in GLOO_JOBS.items() if any(fn is job for fn, _, _ in jobs))
        if world not in done:
            try:
                done[world] = session(world)
            except BaseException as e:  # every module sharing the session fails with it, without a respawn
                done[world] = e
                raise
        if isinstance(done[world], BaseException):
            raise done[world]
        folder = done[world] / job_name(job)
        return folder, [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]

    return results
