import argparse
import subprocess
import sys

import pytest

from megatron_sharpness.config import SharpnessConfig
from megatron_sharpness.integrations.flags import add_critical_sharpness_args, config_from_args


def parse(*flags):
    return add_critical_sharpness_args(argparse.ArgumentParser()).parse_args(list(flags))


def test_off_by_default():
    config = config_from_args(parse())
    assert not config.enabled
    assert config == SharpnessConfig(enabled=False, interval=1)


def test_flags_map_onto_the_config():
    args = parse("--critical-sharpness-interval", "50", "--critical-sharpness-tol", "0.125",
                 "--critical-sharpness-max-search", "20", "--critical-sharpness-initial-guess", "0.5",
                 "--critical-sharpness-micro-batches", "2", "--critical-sharpness-log-file", "out/s.jsonl")
    assert config_from_args(args) == SharpnessConfig(interval=50, tol=0.125, max_search=20, initial_guess=0.5,
                                                     micro_batches=2, log_file="out/s.jsonl")


def test_guard_and_budget_flags_map_onto_the_config():
    args = parse("--critical-sharpness-interval", "50", "--critical-sharpness-budget", "0.01",
                 "--critical-sharpness-guard", "lr", "--critical-sharpness-guard-ratio", "2",
                 "--critical-sharpness-guard-target", "0.25", "--critical-sharpness-guard-recovery", "30")
    assert config_from_args(args) == SharpnessConfig(interval=50, budget=0.01, guard="lr", guard_ratio=2.0,
                                                     guard_target=0.25, guard_recovery=30)


@pytest.mark.parametrize("flag, value, message", [
    ("--critical-sharpness-interval", "-1", "-1 is invalid; allowed: an integer >= 1, or 0 for off"),
    ("--critical-sharpness-interval", "ten", "'ten' is not an integer"),
    ("--critical-sharpness-tol", "1.5", "tol=1.5 is invalid; allowed: a number in the open interval (0, 1)"),
    ("--critical-sharpness-tol", "abc", "'abc' is not a valid float"),
    ("--critical-sharpness-max-search", "0", "max_search=0 is invalid"),
    ("--critical-sharpness-initial-guess", "-2", "initial_guess=-2.0 is invalid"),
    ("--critical-sharpness-micro-batches", "0", "micro_batches=0 is invalid"),
    ("--critical-sharpness-budget", "2", "budget=2.0 is invalid; allowed: null (measure every interval steps) or a share"),
    ("--critical-sharpness-guard", "clip", "guard='clip' is invalid; allowed: off or shorten or lr"),
    ("--critical-sharpness-guard-target", "0", "guard_target=0.0 is invalid; allowed: a number in (0, 1]"),
])
def test_bad_values_fail_at_parsing_naming_the_flag(flag, value, message):
    code = ("import argparse; from megatron_sharpness.integrations.flags import add_critical_sharpness_args;"
            f"add_critical_sharpness_args(argparse.ArgumentParser(prog='pretrain_gpt.py')).parse_args({[flag, value]!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"argument {flag}: {message}" in result.stderr
    assert "Traceback" not in result.stderr


def test_module_flags_map_onto_the_config():
    args = parse("--critical-sharpness-interval", "5", "--critical-sharpness-modules", "default",
                 "--critical-sharpness-modules-interval", "3", "--no-critical-sharpness-modules-on-warning",
                 "--critical-sharpness-warn-ratio", "2.5")
    assert config_from_args(args) == SharpnessConfig(interval=5, modules="default", modules_interval=3,
                                                     modules_on_warning=False, warn_ratio=2.5)
    args = parse("--critical-sharpness-interval", "5", "--critical-sharpness-modules", "emb=embedding.*",
                 "attn=*.self_attention.*,re:linear_proj")
    assert config_from_args(args).modules == {"emb": ["embedding.*"], "attn": ["*.self_attention.*", "re:linear_proj"]}


def test_write_flags_map_onto_the_config():
    args = parse("--critical-sharpness-interval", "5", "--critical-sharpness-write-memory-budget-mib", "2048")
    assert config_from_args(args) == SharpnessConfig(interval=5, write="auto", write_memory_budget_mib=2048.0)
    args = parse("--critical-sharpness-interval", "5", "--critical-sharpness-write", "sharded")
    assert config_from_args(args) == SharpnessConfig(interval=5, write="sharded")


@pytest.mark.parametrize("flag, value, message", [
    ("--critical-sharpness-write", "fast", "write='fast' is invalid; allowed: auto or local or sharded"),
    ("--critical-sharpness-write-memory-budget-mib", "-1", "write_memory_budget_mib=-1.0 is invalid"),
    ("--critical-sharpness-modules", "embedding", "'embedding' is invalid; allowed: default, or NAME=PATTERN"),
    ("--critical-sharpness-modules", "x=re:(", "modules={'x': ['re:(']} is invalid; allowed: valid regular expressions after re:"),
    ("--critical-sharpness-modules-interval", "-1", "modules_interval=-1 is invalid"),
    ("--critical-sharpness-warn-ratio", "0", "warn_ratio=0.0 is invalid"),
])
def test_bad_module_flags_fail_at_parsing(flag, value, message):
    with pytest.raises(SystemExit):
        parse(flag, value)
    code = ("import argparse; from megatron_sharpness.integrations.flags import add_critical_sharpness_args;"
            f"add_critical_sharpness_args(argparse.ArgumentParser(prog='pretrain_gpt.py')).parse_args({[flag, value]!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"argument {flag}: {message}" in result.stderr, result.stderr
