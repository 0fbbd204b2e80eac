"""Config loading: bundled names, base inheritance, dotted overrides, and one-line errors."""

import pytest

from daybreak.config import Config, load_config
from daybreak.errors import UserError


def test_bundled_and_overrides():
    cfg = load_config("tiny", ["train.steps=7", "optim.lr=0.01", "optim.name=adamw", "model.depth=2",
                               "data.captions={long: 1.0}", "sample.prompts=[a, b]"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.01 and cfg.optim.name == "adamw"
    assert cfg.model.depth == 2 and cfg.data.captions == {"long": 1.0} and cfg.sample.prompts == ["a", "b"]
    assert isinstance(cfg.optim.lr, float)
    load_config("tiny", ["optim.lr=1"])  # an int where a float is wanted is fine


def test_base_inheritance_and_round_trip(tmp_path):
    stage2 = load_config("speedrun-1024")
    assert stage2.train.steps == 20_000 and stage2.train.global_batch == 512
    assert stage2.repa.enabled is False and stage2.tread.enabled is True  # inherited from speedrun-512
    assert stage2.model.preset == "prx-small" and stage2.data.buckets == "aspect" and stage2.data.image_size == 1024
    path = tmp_path / "c.yaml"
    path.write_text(stage2.to_yaml())
    assert load_config(path) == stage2


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("nosuch.key=1", "nosuch"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("optim.lr=fast", "optim.lr"),
    ("tread.enabled=maybe", "tread.enabled"),
    ("optim.name=sgd", "optim.name"),
    ("train=3", "train"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(UserError) as e:
        load_config("tiny", [override])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_cross_checks():
    with pytest.raises(UserError, match="multiple"):
        load_config("tiny", ["train.global_batch=10", "train.micro_batch=4"])
    with pytest.raises(UserError, match="data.path"):
        load_config("tiny", ["data.source=imagefolder"])
    with pytest.raises(UserError, match="alternatives"):
        load_config("tiny", ["tread.enabled=true", "sprint.enabled=true"])
    with pytest.raises(UserError, match="not found"):
        load_config("no-such-config")


def test_defaults_are_the_speedrun_numbers():
    c = Config()
    assert (c.objective.shift, c.objective.uniform_prob, c.objective.t_clamp, c.objective.caption_dropout) == (3.0, 0.1, 0.05, 0.1)
    assert (c.optim.lr, c.optim.betas, c.optim.eps, c.optim.grad_clip, c.optim.muon_momentum) == (1e-4, [0.9, 0.95], 1e-8, 0.2, 0.95)
    assert (c.ema.decay, c.ema.every) == (0.999, 10)
    assert (c.tread.fraction, c.tread.start, c.tread.end) == (0.5, 2, 12)
    assert (c.repa.block_index, c.repa.weight) == (7, 0.5)
    assert (c.perceptual.lpips_weight, c.perceptual.dino_weight) == (0.1, 0.01)


def test_every_ingredient_owns_its_section():
    """One registry line gives an ingredient its config section, its checks and its builder."""
    import dataclasses

    from daybreak.recipe import INGREDIENTS

    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    for name, ing in INGREDIENTS.items():
        assert ing.name == name and sections[name] is ing.Config
        assert getattr(Config(), name).enabled is False
        assert callable(ing.Config.check) and "from_config" in vars(ing)
    with pytest.raises(UserError, match="tread.fraction"):
        load_config("tiny", ["tread.enabled=true", "tread.fraction=1.5"])
    with pytest.raises(UserError, match="sprint.end"):
        load_config("tiny", ["sprint.enabled=true", "sprint.end=99"]).sprint.check(depth=4)
