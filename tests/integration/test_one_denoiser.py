"""A run builds its denoiser once: the training step, contrastive flow matching, the validation loss,
the sample grids and periodic evaluation all read the network's output through that one instance."""

from helpers import tiny

from daybreak.diffusion.objective import Denoiser
from daybreak.run import build_trainer
from daybreak.training.logger import read_metrics


def test_a_run_constructs_one_denoiser(tmp_path, monkeypatch):
    built, init = [], Denoiser.__init__

    def counted(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(Denoiser, "__init__", counted)
    run = tmp_path / "run"
    trainer = build_trainer(tiny(run, "train.steps=2", "train.checkpoint_every=100", "train.sample_every=1",
                                 "sample.prompts=[a red circle]", "sample.steps=2", "val.every=1", "val.num=2",
                                 "eval.every=2", "eval.num=2", "eval.steps=1", "eval.metrics=[adherence]",
                                 "contrastive.enabled=true", "text.tokenizer_sample=100"), progress=False)
    trainer.fit()
    # every path that samples or scores ran: grids at steps 1 and 2 and the final one, val and eval logged
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["final.png", "step_0000001.png",
                                                                     "step_0000002.png"]
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics if "val/loss" in r] == [1, 2]
    assert [r["step"] for r in metrics if "eval/adherence" in r] == [2]
    assert [r["step"] for r in metrics if "loss/contrastive" in r] == [1, 2]
    assert len(built) == 1
    assert trainer.denoiser is built[0] and trainer.ingredients["contrastive"].denoiser is built[0]
