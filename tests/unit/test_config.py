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


@pytest.mark.parametrize("raw, value", [("1e-3", 1e-3), ("3E-4", 3e-4), (".5", 0.5), ("-1e-2", -1e-2),
                                        ("2.5e+1", 25.0), ("1_000", 1000.0), ("7", 7.0)])
def test_numbers_as_people_type_them(raw, value):
    from daybreak.config import parse_override, yaml_load

    assert parse_override(f"optim.weight_decay={raw}")[1] == value
    assert yaml_load(f"lr: {raw}\n")["lr"] == value  # config files read the same way
    if value >= 0:
        assert load_config("tiny", [f"optim.weight_decay={raw}"]).optim.weight_decay == value


@pytest.mark.parametrize("raw, value", [("true", True), ("false", False), ("yes", True), ("no", False),
                                        ("1", True), ("0", False), ("True", True), ("off", False)])
def test_booleans_as_people_type_them(raw, value):
    assert load_config("tiny", [f"tread.enabled={raw}"]).tread.enabled is value


def test_integers_lists_and_mappings_in_overrides():
    cfg = load_config("tiny", ["train.steps=1e3", "train.checkpoint_every=1_000", "optim.betas=[0.9, 0.99]",
                               "data.captions={long: 2, short: 0.5}", "sample.prompts=[a red circle, b]"])
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int) and cfg.train.checkpoint_every == 1000
    assert cfg.optim.betas == [0.9, 0.99] and cfg.data.captions == {"long": 2.0, "short": 0.5}
    assert cfg.sample.prompts == ["a red circle", "b"]


@pytest.mark.parametrize("override, message", [
    ("no.such.key=1", "unknown config key 'no.such.key' (top-level keys: seed, "),
    ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean optim.lr"),
    ("trian.steps=3", "unknown config key 'trian.steps'; did you mean train.steps"),
    ("train.stepz=3", "unknown config key 'train.stepz'; did you mean train.steps"),
])
def test_unknown_keys_are_named_in_full_with_suggestions(override, message):
    with pytest.raises(UserError) as e:
        load_config("tiny", [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_unknown_key_in_a_file_is_named_with_suggestions(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: tiny\noptim:\n  lrr: 1e-3\n")
    with pytest.raises(UserError, match=r"unknown config key 'optim.lrr'; did you mean optim.lr"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", "'optim.lr' must be > 0, got 0.0"),
    ("optim.muon_lr=-1", "'optim.muon_lr' must be > 0"),
    ("optim.betas=[0.9, 1.0]", "'optim.betas[1]' must be in [0, 1), got 1.0"),
    ("optim.grad_clip=0", "'optim.grad_clip' must be > 0"),
    ("ema.decay=-0.1", "'ema.decay' must be in [0, 1], got -0.1"),
    ("ema.start=-1", "'ema.start' must be >= 0"),
    ("train.steps=0", "'train.steps' must be >= 1, got 0"),
    ("train.micro_batch=0", "'train.micro_batch' must be >= 1"),
    ("train.checkpoint_every=0", "'train.checkpoint_every' must be >= 1"),
    ("train.keep_checkpoints=-1", "'train.keep_checkpoints' must be >= 0"),
    ("train.max_nonfinite=0", "'train.max_nonfinite' must be >= 1"),
    ("objective.t_clamp=0", "'objective.t_clamp' must be in (0, 1]"),
    ("objective.uniform_prob=1.5", "'objective.uniform_prob' must be in [0, 1], got 1.5"),
    ("data.captions={long: -1}", "'data.captions.long' must be >= 0"),
    ("data.num_workers=-1", "'data.num_workers' must be >= 0"),
    ("model.depth=0", "'model.depth' must be > 0"),
    ("sample.steps=0", "'sample.steps' must be >= 1"),
    ("eval.num=0", "'eval.num' must be >= 1"),
    ("eval.every=-1", "'eval.every' must be >= 0"),
    ("optim.lr=.nan", "'optim.lr' must be a finite number, got nan"),
])
def test_ranges_are_one_line_naming_key_and_range(override, message):
    with pytest.raises(UserError) as e:
        load_config("tiny", [override])
    assert str(e.value) == f"config key {message}" or str(e.value).startswith(f"config key {message}")
    assert "\n" not in str(e.value)


def test_ingredient_ranges_live_in_their_sections():
    for override, key in (("tread.start=-1", "tread.start"), ("sprint.drop_ratio=1", "sprint.drop_ratio"),
                          ("repa.weight=-0.5", "repa.weight"), ("repa.until_step=-1", "repa.until_step"),
                          ("perceptual.lpips_weight=-1", "perceptual.lpips_weight"),
                          ("contrastive.weight=-1", "contrastive.weight")):
        section = key.split(".")[0]
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            load_config("tiny", [f"{section}.enabled=true", override])


def test_changed_keys_lists_what_differs():
    from daybreak.config import changed_keys

    a = load_config("tiny").to_dict()
    b = load_config("tiny", ["train.steps=99", "data.captions={long: 1}"]).to_dict()
    assert changed_keys(a, b) == {"train.steps": (a["train"]["steps"], 99), "data.captions": ({}, {"long": 1.0})}
    assert changed_keys(a, a) == {}


def test_wandb_without_the_extra_names_it():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(UserError, match=r"log.wandb'=true needs the wandb extra: pip install 'daybreak\[wandb\]'"):
        load_config("tiny", ["log.wandb=true"])
    assert load_config("tiny", ["log.project=p", "log.group=g"]).log.group == "g"
