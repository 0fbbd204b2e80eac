"""Host-device syncs per training step, counted on the CPU by `daybreak.bench.syncs.SyncCounter`.

On a GPU each of them stalls the host until the queued work is done; the step allows one, the
readback of its one all-reduce (loss terms, gradient norm, stop flags), logging steps included.
"""

import torch
from helpers import Tap, tiny

from daybreak.bench.syncs import SyncCounter
from daybreak.run import build_trainer


def test_counter_sees_each_kind_of_sync():
    from daybreak.training import parallel  # a daybreak module: calls from there count

    x = torch.ones(3)
    with SyncCounter() as c:
        parallel.local(x).sum().item()  # from the test: not daybreak's, not counted
    assert c.count == 0
    code = compile("t[0].item(); t.tolist(); bool(t[0]); t.cpu(); torch.tensor([1.0], device='cpu'); t.numpy()",
                   parallel.__file__, "exec")  # as if written in a daybreak module
    with SyncCounter() as c:
        exec(code, {"t": x, "torch": torch})
    assert c.count == 5  # .numpy() cannot sync (it refuses device tensors)
    exec(code, {"t": x, "torch": torch})
    assert c.count == 5  # the methods are restored on exit


def test_one_sync_per_step_logging_or_not(tmp_path):
    cfg = tiny(tmp_path / "run", "train.steps=4", "train.log_every=2", "train.checkpoint_every=100",
               "train.global_batch=4", "train.micro_batch=2", "tread.enabled=true", "tread.start=0", "tread.end=0",
               "text.tokenizer_sample=200")
    trainer = build_trainer(cfg, progress=False)
    counter, per_step = SyncCounter(), []

    def boundary(i, batch):  # batch i is drawn at the start of step i: the count since is step i-1's
        if i:
            per_step.append(dict(counter.sites))
        counter.reset()

    trainer.data = Tap(trainer.data, boundary)
    with counter:
        trainer.fit()
    # steps 1 (no log), 2 (logs), 3 (no log): one readback each
    assert [sum(s.values()) for s in per_step] == [1, 1, 1], per_step
    assert all(list(s) == [next(iter(per_step[0]))] for s in per_step)  # the same line: the readback
