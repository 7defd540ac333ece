"""Configuration: presets, overrides, and every class of bad input refused with key, value and rule."""

from __future__ import annotations

import pytest

from kaggle_runner.config import ConfigError, RunConfig, load_config, load_preset, parse_toml, preset_text


def test_seed_preset_reproduces_the_seed_notebook_config():
    config = load_preset("seed")
    seed = {"n_embd": 256, "n_layer": 8, "n_head": 8, "max_length": 512, "batch_size": 8,
            "gradient_accumulation_steps": 8, "learning_rate": 5e-4, "epochs": 3, "save_steps": 1000,
            "max_checkpoints": 4, "resume_from_checkpoint": None}
    assert {k: getattr(config, k) for k in seed} == seed
    assert config.dataset == "wikitext-103" and config.machine_shape == "NvidiaTeslaT4"
    assert config.enable_internet and config.is_private


def test_keys_are_flat_so_set_needs_no_section():
    config = load_preset("seed", ["epochs=5", "sample_prompt=Once upon", "learning_rate=1e-3"])
    assert (config.epochs, config.sample_prompt, config.learning_rate) == (5, "Once upon", 1e-3)


@pytest.mark.parametrize("override, expected", [
    ("n_head=7", "n_embd (256) must be divisible by n_head (7)"),
    ("batch_size=0", "batch_size = 0: Input should be greater than 0"),
    ("learning_rate=-1", "learning_rate = -1"),
    ("epochs=0", "epochs = 0"),
    ("save_steps=-5", "save_steps = -5"),
    ("max_checkpoints=0", "max_checkpoints = 0"),
    ('machine_shape="NvidiaTeslaV100"', "unknown machine shape"),
    ('title="Something Else"', "slugifies to 'something-else', not to slug 'kaggle-runner-gpt'"),
    ('slug="ab"', "slug"),
    ('slug="Has Spaces"', "lower-case letters"),
    ("n_embdd=3", "unknown key"),
    ('dataset="text-files"', "needs text_files_path"),
    ("epochs=many", "epochs = \"many\""),
])
def test_bad_values_name_key_value_and_rule(override, expected):
    with pytest.raises(ConfigError) as error:
        load_preset("seed", [override])
    assert expected in str(error.value)


def test_unknown_key_in_file_and_duplicate_across_sections(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(preset_text("tiny") + "\n[extra]\nbatch_sizes = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'batch_sizes'"):
        load_config(bad)
    dup = tmp_path / "dup.toml"
    dup.write_text("[model]\nn_embd = 64\n[training]\nn_embd = 32\n")
    with pytest.raises(ConfigError, match="appears in both"):
        load_config(dup)


def test_broken_toml_is_named_with_its_line(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[model]\nn_embd = 64\nn_layer = = 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(broken)
    assert str(broken) in str(error.value) and "line 3" in str(error.value)


def test_missing_file_says_how_to_create_one(tmp_path):
    with pytest.raises(ConfigError, match="kaggle-runner init"):
        load_config(tmp_path / "nope.toml")


def test_retired_shape_is_accepted_with_a_warning():
    config = load_preset("seed", ['machine_shape="NvidiaTeslaP100"'])
    assert "retired" in config.warnings()[0]


def test_presets_parse_and_every_key_is_known():
    for name in ("tiny", "seed"):
        assert set(parse_toml(preset_text(name), name)) <= set(RunConfig.model_fields)
