"""The run config: overrides are parsed as YAML and coerced to the field's type; a bad
key or value fails with the key's name."""

from __future__ import annotations

import pytest

from dissect_dist.config import ConfigError, apply_overrides, build_config

BASE = {"data": {"train_manifest": "m.json"}}


def _cfg(*overrides: str):
    return build_config(apply_overrides(BASE, list(overrides)))


def test_overrides_are_coerced_to_the_fields_types():
    c = _cfg("optim.lr=5e-4", "optim.fused=false", "train.epochs=3.0", "model.name=123")
    assert c.optim.lr == 5e-4 and c.optim.fused is False and c.train.epochs == 3
    assert c.model.name == "123" and c.optim.fused is False
    assert _cfg().optim.fused is True


@pytest.mark.parametrize("override, message", [
    ("selection.ratio=1.5", "selection.ratio: 1.5: need 0 < r <= 1"),
    ("optim.fused=maybe", "optim.fused: 'maybe' is not true or false"),
    ("train.epochs=two", "train.epochs: 'two' is not an integer"),
    ("optim.lr=fast", "optim.lr: 'fast' is not a number"),
    ("optim.lrate=1", "optim.lrate: unknown key"),
    ("selection.scope=regional", "selection.scope: 'regional', choose one of"),
    ("model.mha_fastpath=fast", "model.mha_fastpath: 'fast', choose one of"),
    ("ratio=0.5", "write section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cfg(override)
