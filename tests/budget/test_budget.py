"""The budget stage's configuration, VAttentionConfig (sizes, rule, epsilon, delta): every
field's range is checked and the error names the field; the boundaries are accepted."""
from __future__ import annotations

import pytest

from vattention import VAttentionConfig


@pytest.mark.parametrize("field,value", [
    ("epsilon", 0.0), ("epsilon", 1.0), ("epsilon", -0.1), ("epsilon", float("nan")),
    ("epsilon", "0.1"), ("epsilon", None),
    ("delta", 0.0), ("delta", 1.0), ("delta", 2.0), ("delta", float("nan")), ("delta", "x"),
    ("base_rate", 0.0), ("base_rate", 1.5), ("base_rate", -0.5), ("base_rate", float("nan")),
    ("base_rate", None), ("base_rate", 1), ("base_rate", 0), ("base_rate", -5),
    ("base_rate", True), ("base_rate", "128"),
    ("reuse_pilot", 1), ("reuse_pilot", "yes"), ("reuse_pilot", None),
    ("sink", -1), ("sink", 1.5), ("sink", -0.25), ("sink", float("nan")), ("sink", "8"),
    ("sink", True), ("sink", None),
    ("local", -3), ("local", 2.0), ("local", [1]),
    ("heavy", -1), ("heavy", 1.01), ("heavy", False),
    ("rule", "Ratio"), ("rule", "oracle"), ("rule", None),
    ("selector", "approx"), ("selector", ""),
    ("share_gqa", 1), ("share_gqa", "yes"),
    ("num_splits", -1), ("num_splits", 1.5), ("num_splits", True),
])
def test_config_rejects_out_of_range_fields(field, value):
    with pytest.raises(ValueError, match=rf"VAttentionConfig\.{field}"):
        VAttentionConfig(**{field: value})


def test_config_replace_validates_too():
    cfg = VAttentionConfig()
    with pytest.raises(ValueError, match="epsilon"):
        cfg.replace(epsilon=1.5)
    with pytest.raises(TypeError):
        cfg.replace(no_such_field=1)


def test_config_accepts_boundaries():
    VAttentionConfig(sink=0, local=0, heavy=0, base_rate=1.0, epsilon=1e-6, delta=0.999)
    VAttentionConfig(sink=1.0, local=0.0, heavy=1.0, rule="paper", num_splits=0)
    # The pilot as a count: 2 draws is the least with a variance, and any larger count fits.
    VAttentionConfig(base_rate=2, reuse_pilot=True)
    VAttentionConfig(base_rate=10 ** 9, reuse_pilot=False)
    assert not VAttentionConfig(rule="denominator").verified
