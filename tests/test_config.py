import math

import pytest

from megatron_sharpness.config import ConfigError, SharpnessConfig


def test_defaults_follow_the_paper():
    config = SharpnessConfig()
    assert config.tol == 1 / 16 and config.max_search == 40 and config.initial_guess == 1.0
    assert config.enabled and config.warm_start and config.interval >= 1


@pytest.mark.parametrize("field, value, allowed", [
    ("interval", 0, "integer >= 1"),
    ("interval", -5, "integer >= 1"),
    ("interval", 2.5, "integer >= 1"),
    ("interval", True, "integer >= 1"),
    ("tol", 0.0, "(0, 1)"),
    ("tol", 1.0, "(0, 1)"),
    ("tol", -0.1, "(0, 1)"),
    ("tol", math.nan, "(0, 1)"),
    ("tol", "1/16", "(0, 1)"),
    ("max_search", 0, "integer >= 1"),
    ("initial_guess", -1.0, "> 0"),
    ("initial_guess", 0.0, "> 0"),
    ("initial_guess", math.inf, "> 0"),
    ("enabled", "yes", "true or false"),
    ("warm_start", 1, "true or false"),
    ("micro_batches", 0, "integer >= 1"),
    ("micro_batches", 1.5, "integer >= 1"),
    ("log_file", "", "file path"),
    ("log_file", 3, "file path"),
    ("modules", "all", "\"default\", or a mapping"),
    ("modules", {"emb": []}, "pattern or [patterns]"),
    ("modules", {"emb": ["re:["]}, "valid regular expressions after re:"),
    ("modules_interval", -1, "integer >= 0"),
    ("modules_max_search", 0, "integer >= 1"),
    ("modules_on_warning", "yes", "true or false"),
    ("warn_ratio", 0.0, "finite number > 0"),
    ("warn_ratio", math.inf, "finite number > 0"),
    ("write", "fast", "auto or local or sharded"),
    ("write", None, "auto or local or sharded"),
    ("write_memory_budget_mib", -1, "finite number >= 0"),
    ("write_memory_budget_mib", math.nan, "finite number >= 0"),
    ("write_memory_budget_mib", "1 GiB", "finite number >= 0"),
])
def test_each_bad_value_names_the_field_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ConfigError) as error:
        SharpnessConfig(**{field: value})
    message = str(error.value)
    assert f"{field}={value!r}" in message
    assert allowed in message


def test_from_dict_rejects_unknown_keys_and_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as error:
        SharpnessConfig.from_dict({"interval": 5, "tolerance": 0.1, "every": 3})
    message = str(error.value)
    assert "every, tolerance" in message
    for name in SharpnessConfig.field_names():
        assert name in message


def test_from_dict_rejects_a_non_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        SharpnessConfig.from_dict([("interval", 5)])


def test_from_dict_round_trip():
    config = SharpnessConfig.from_dict({"interval": 7, "tol": 0.125, "log_file": "x.jsonl"})
    assert config == SharpnessConfig(interval=7, tol=0.125, log_file="x.jsonl")
    assert SharpnessConfig.from_dict(config.to_dict()) == config


def test_modules_from_a_ds_config_section_normalise_to_pattern_lists():
    config = SharpnessConfig.from_dict({"modules": {"emb": "embedding.*", "out": ["output_layer.*", "re:final"]},
                                        "modules_interval": 0, "warn_ratio": 2})
    assert config.modules == {"emb": ["embedding.*"], "out": ["output_layer.*", "re:final"]}
    assert config.to_dict()["modules"] == config.modules and config.warn_ratio == 2
    assert SharpnessConfig().modules is None and SharpnessConfig(modules="default").modules == "default"


def test_a_write_memory_budget_only_with_write_auto():
    assert SharpnessConfig(write_memory_budget_mib=512).write == "auto"
    with pytest.raises(ConfigError) as error:
        SharpnessConfig(write="local", write_memory_budget_mib=512)
    assert "write_memory_budget_mib=512 is invalid" in str(error.value) and "write='local'" in str(error.value)
    assert SharpnessConfig.from_dict({"write": "sharded"}).write == "sharded"
