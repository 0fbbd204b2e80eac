"""PRX's baseline trains without EMA (raw weights everywhere), and SPRINT's fusion is part of one model:
averaged by EMA, saved, loaded by load_model / generate / sample / init_from, refused by export."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from daybreak.cli import main
from daybreak.errors import UserError
from daybreak.evaluate.run import evaluate_checkpoint
from daybreak.export import export
from daybreak.pipeline import FusedTransformer, load_model, load_pipeline
from daybreak.run import build_trainer, train
from helpers import tiny

SPRINT = ["sprint.enabled=true", "sprint.start=1", "sprint.end=2"]


def inputs(model):
    g = torch.Generator().manual_seed(0)
    c = model.config
    return (torch.randn(2, c["in_channels"], 16, 16, generator=g), torch.tensor([0.3, 0.8]),
            torch.randn(2, 5, c["context_in_dim"], generator=g), torch.ones(2, 5, dtype=torch.bool))


def test_a_run_without_ema_is_used_raw_everywhere(tmp_path):
    final = train(tiny(tmp_path / "run", "train.steps=2", "ema.enabled=false"), progress=False)
    assert not (final / "transformer_ema.safetensors").exists()
    raw = load_file(str(final / "transformer.safetensors"))
    assert all(torch.equal(load_model(final).state_dict()[k], v) for k, v in raw.items())  # ema=True: raw anyway
    result = evaluate_checkpoint(final, ["fd_tiny"], num=2, steps=1, out=tmp_path / "e.json", grid=False)
    assert result["weights"] == "raw"
    out = export(final, tmp_path / "export")
    exported = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in raw.items())


def test_sprint_is_one_model(tmp_path, capsys):
    final = train(tiny(tmp_path / "run", "train.steps=3", "ema.decay=0.5", "ema.every=1", *SPRINT), progress=False)
    raw, avg = load_file(str(final / "recipe.safetensors")), load_file(str(final / "recipe_ema.safetensors"))
    assert set(avg) == {"sprint.mask_token", "sprint.fusion.weight", "sprint.fusion.bias"}
    assert not torch.equal(raw["sprint.fusion.weight"], avg["sprint.fusion.weight"])  # the EMA lags the weights

    for ema, expect in ((True, avg), (False, raw)):  # sampling pairs EMA blocks with the EMA fusion
        (sprint,) = load_pipeline(final, ema=ema).ingredients
        assert torch.equal(sprint.fusion.weight.cpu(), expect["sprint.fusion.weight"])

    model = load_model(final)
    assert isinstance(model, FusedTransformer)
    x = inputs(model)
    with torch.no_grad():
        fused = model(*x)
        by_hand = model.transformer(*x, hooks=model.recipe["sprint"].dense_hooks())
        bare = model.transformer(*x)
    assert torch.equal(fused, by_hand) and (fused - bare).abs().max() > 1e-4

    with pytest.raises(UserError, match="--drop-sprint-fusion"):
        export(final, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert main(["export", str(final), str(tmp_path / "refused")]) == 2
    assert "SPRINT model" in capsys.readouterr().err
    export(final, tmp_path / "dropped", drop_sprint_fusion=True)
    assert "outputs differ from `daybreak sample`" in capsys.readouterr().out

    # init_from carries the fusion and its EMA into the next run
    trainer = build_trainer(tiny(tmp_path / "next", "train.steps=1", *SPRINT), progress=False)
    trainer.state.init_from(str(final))
    assert torch.equal(trainer.ingredients["sprint"].fusion.weight.detach(), raw["sprint.fusion.weight"])
    assert torch.equal(trainer.ema.shadow["recipe.sprint.fusion.weight"], avg["sprint.fusion.weight"])
