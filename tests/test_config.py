"""Config: presets, overrides (type-checked, unknown keys rejected), digests."""

from __future__ import annotations

import json

import pytest

from benchmark.config import Config, ConfigError, apply_overrides, digest, flatten, parse_set, resolve, section_digest


def test_presets_resolve_and_differ() -> None:
    smoke, quick, paper = (resolve(p) for p in ("smoke", "quick", "paper"))
    assert smoke.data.size == 16 and quick.data.size == 32 and paper.data.size == 128
    assert paper.model.perceptual_backbone == "efficientnet_b0"
    assert smoke.model.perceptual_backbone == quick.model.perceptual_backbone == "resnet3d_aux"
    assert len({digest(smoke), digest(quick), digest(paper)}) == 3


def test_overrides_are_type_checked() -> None:
    cfg = resolve("smoke", overrides=parse_set(["train.lr_g=3e-4", "loss.kl=1",
                                                "model.perceptual_backbone=efficientnet_b0"]))
    assert cfg.train.lr_g == 3e-4
    assert cfg.loss.kl == 1.0 and isinstance(cfg.loss.kl, float)  # int accepted where float expected
    assert cfg.model.perceptual_backbone == "efficientnet_b0"  # bare words are strings
    with pytest.raises(ConfigError, match="model.perceptual_backbone='x': allowed: one of"):
        resolve("smoke", overrides=parse_set(["model.perceptual_backbone=x"]))  # ... from a choice set
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(Config(), {"train.batch_size": 2.5})
    with pytest.raises(ConfigError, match="expected bool"):
        apply_overrides(Config(), {"train.amp": 1})


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), {"train.lrr": 1.0})
    assert "train.lr_g" in str(err.value) and "unknown config key 'train.lrr'" in str(err.value)


def test_malformed_set_values() -> None:
    with pytest.raises(ConfigError, match="malformed"):
        parse_set(["train.lr_g=[1,"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_set(["train.lr_g"])


def test_config_file_roundtrip(tmp_path) -> None:
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"method": "vae", "loss.kl": 0.05}))
    cfg = resolve("smoke", config_file=path)
    assert cfg.loss.kl == 0.05 and cfg.method == "vae"
    assert flatten(cfg)["loss.kl"] == 0.05


def test_digest_is_stable_and_sensitive() -> None:
    a, b = resolve("smoke"), resolve("smoke")
    assert digest(a) == digest(b)
    c = resolve("smoke", overrides={"train.seed": 1})
    assert digest(a) != digest(c)
    # a stage keyed on the heads section ignores the generator's loss weights
    d = resolve("smoke", overrides={"loss.kl": 0.5})
    assert section_digest(a, ("heads",)) == section_digest(d, ("heads",))
