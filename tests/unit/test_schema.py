"""Sections own their checks: registries are a key's choices, ranges sit on fields, sections nest."""

import typing

import pytest

from daybreak.config import field_bounds, load_config
from daybreak.data.buckets import BUCKETS
from daybreak.data.sources import SOURCES
from daybreak.diffusion.sampling import GUIDANCE, SAMPLERS
from daybreak.errors import UserError
from daybreak.optim import OPTIMIZERS, SCHEDULES
from daybreak.schema import Registry
from daybreak.space import SPACES
from daybreak.text import TEXT_TOWERS

KEYED = [("data.source", SOURCES), ("data.buckets", BUCKETS), ("sample.guidance", GUIDANCE),
         ("sample.sampler", SAMPLERS), ("optim.name", OPTIMIZERS), ("optim.schedule", SCHEDULES),
         ("space.kind", SPACES), ("text.kind", TEXT_TOWERS)]


@pytest.mark.parametrize("key, registry", KEYED)
def test_a_keys_choices_are_its_registrys_names(key, registry):
    from daybreak.config import Config

    section, name = key.split(".")
    hints = typing.get_type_hints(typing.get_type_hints(Config)[section])
    assert typing.get_args(hints[name]) == tuple(registry) and registry.key == key
    for choice in registry:  # each name loads (what a name needs beyond the key is checked where it builds)
        extra = [f"data.path={__file__}"] if key == "data.source" and choice != "shapes" else []
        assert load_config("tiny", [f"{key}={choice}", *extra]) is not None
    with pytest.raises(UserError) as e:
        registry["nope"]
    assert str(e.value) == f"config key '{key}' must be one of {', '.join(registry)}; got 'nope'"


def test_an_unnamed_registry_says_what_it_holds():
    with pytest.raises(UserError, match=r"^unknown widget 'c'; choose from a, b$"):
        Registry(None, {"a": 1, "b": 2}, what="widget")["c"]


def test_nested_sections_and_entries_are_checked_with_their_full_key():
    with pytest.raises(UserError, match=r"^config key 'val\.data\.image_size' must be >= 1, got 0$"):
        load_config("tiny", ["val.data={source: shapes, image_size: 0}"])
    with pytest.raises(UserError, match=r"^config key 'data\.mix\[1\]\.captions\.long' must be >= 0, got -1\.0$"):
        load_config("tiny", ["data.mix=[{source: shapes, name: a}, {source: shapes, name: b, captions: {long: -1}}]"])


def test_a_ranged_field_gives_its_bounds_to_the_cli():
    assert field_bounds("sample.cfg") == ((0, "["), None)
    assert field_bounds("objective.t_clamp") == ((0, "("), (1, "]"))
