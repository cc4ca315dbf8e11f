"""The config convention's checks (training/config.py): declared ranges with errors naming key, value and range,
checks a method's own sections declare with one line, YAML syntax errors as file:line, and scalars that stay
what the user wrote."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from test_train import ROOT, env, write_config

from training.config import ConfigError, check, load_config, validate
from training.methods import load_train_config
from training.methods.dinov2 import DinoV2TrainConfig
from training.train_config import TrainConfig


@pytest.mark.parametrize("override, message", [
    ("train.log_every=0", "train.log_every=0 is out of range: allowed >= 1"),
    ("optim.grad_accum_steps=0", "optim.grad_accum_steps=0 is out of range: allowed >= 1"),
    ("optim.batch_size=-4", "optim.batch_size=-4 is out of range: allowed >= 1"),
    ("optim.epochs=0", "optim.epochs=0 is out of range: allowed >= 1"),
    ("train.keep_last=0", "train.keep_last=0 is out of range: allowed >= 1"),
    ("train.max_nonfinite=0", "train.max_nonfinite=0 is out of range: allowed >= 1"),
    ("train.max_steps=0", "train.max_steps=0 is out of range: allowed >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1 is out of range: allowed >= 0"),
    ("data.max_skipped_fraction=1.5", "data.max_skipped_fraction=1.5 is out of range: allowed in [0, 1]"),
    ("data.skip_window=0", "data.skip_window=0 is out of range: allowed >= 1"),
    ("crops.global_scale=[0.5, 0.3]",
     "crops.global_scale=[0.5, 0.3] is out of range: allowed a [min, max] pair with 0 < min <= max <= 1"),
    ("crops.local_scale=[0, 0.3]", "crops.local_scale=[0.0, 0.3] is out of range"),
    ("crops.local_scale=[0.05, 1.2]", "crops.local_scale=[0.05, 1.2] is out of range"),
    ("crops.resolutions=[[224, 98, 0.5]]", "the probabilities must sum to 1"),
    ("crops.blur=offical", "crops.blur='offical' is not one of ['intended', 'official']"),
    ("train.mixed_precision=fp32", "train.mixed_precision='fp32' is not one of ['no', 'bf16', 'fp16', 'fp8']"),
    ("optim.layerwise_decay=0", "optim.layerwise_decay=0.0 is out of range: allowed in (0, 1]"),
    ("optim.base_lr=.nan", "optim.base_lr=nan is out of range: allowed >= 0"),
])
def test_out_of_range_values_name_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_train_config([override])
    assert message in str(err.value)


def test_every_problem_is_reported_at_once_and_python_configs_are_checked_too():
    with pytest.raises(ConfigError, match=r"2 config values are invalid:\n  optim.batch_size=0 .*\n  train.log_every=0"):
        load_train_config(["optim.batch_size=0", "train.log_every=0"])
    cfg = DinoV2TrainConfig()
    validate(cfg)  # the defaults pass
    cfg.optim.grad_accum_steps = 0
    with pytest.raises(ConfigError, match="optim.grad_accum_steps=0"):
        validate(cfg)  # what training.loop.train runs first
    assert load_train_config(["crops.local_scale=[0.32, 0.32]", "train.max_steps=null"]).train.max_steps is None


@dataclass
class _ProbeSection:
    sample_probability: float = field(default=0.5, metadata=check(ge=0, le=1))
    temperature: float = field(default=0.07, metadata=check(gt=0))
    ratio_min_max: tuple[float, float] = field(default=(0.1, 0.5), metadata=check(ge=0, le=1, ordered=True))


@dataclass
class _MethodConfig(TrainConfig):
    probe: _ProbeSection = field(default_factory=_ProbeSection)


def test_a_method_section_declares_its_checks_in_one_line_per_field():
    assert load_config(_MethodConfig, ["probe.sample_probability=1"]).probe.sample_probability == 1.0
    with pytest.raises(ConfigError, match=r"probe.sample_probability=1.5 is out of range: allowed in \[0, 1\]"):
        load_config(_MethodConfig, ["probe.sample_probability=1.5"])
    with pytest.raises(ConfigError, match=r"probe.temperature=0.0 is out of range: allowed > 0"):
        load_config(_MethodConfig, ["probe.temperature=0"])
    with pytest.raises(ConfigError, match=r"probe.ratio_min_max=\[0.5, 0.1\] is out of range: allowed a \[min, max\] "
                                          r"pair with 0 <= min <= max <= 1"):
        load_config(_MethodConfig, ["probe.ratio_min_max=[0.5, 0.1]"])


# The DINOv2 sections (training/methods/dinov2.py) declare their own checks.
@pytest.mark.parametrize("override", ["masking.sample_probability=1.5", "teacher.momentum=1.2",
                                      "masking.ratio_min_max=[0.5, 0.1]", "teacher.momentum_end=-0.1"])
def test_dinov2_sections_are_checked(override):
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]}=.* is out of range"):
        load_train_config([override])


def test_yaml_syntax_error_is_file_line_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  batch_size: 4\n  betas: [0.9, 0.99\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:4:\d+: .*flow sequence.*\(YAML syntax\)"):
        load_train_config(["--config", str(bad)])
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(bad)], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith(f"config error: {bad}:4:")
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("optim:\n  batch_size: 4\n  epochs: ten\n")
    with pytest.raises(ConfigError, match=rf"optim.epochs \({wrong_type}:3\): expected an integer, got 'ten'"):
        load_train_config(["--config", str(wrong_type)])


def test_strings_stay_what_was_written(tmp_path):
    """YAML 1.1 reads `off` as false, `010` as octal 8 and `1.10` as 1.1; string fields keep the text."""
    cfg = load_train_config(["data.split=off", "data.image_column=010", "hub.model_id=org/1.10",
                             "data.dataset=1.10", "train.mixed_precision=no", "optim.epochs=010"])
    assert (cfg.data.split, cfg.data.image_column, cfg.hub.model_id) == ("off", "010", "org/1.10")
    assert (cfg.data.dataset, cfg.train.mixed_precision) == ("1.10", "no")
    assert cfg.optim.epochs == 10  # an integer field reads decimal text as decimal (YAML 1.2), not octal
    path = write_config(tmp_path, data={"split": "placeholder"})
    path.write_text(path.read_text().replace("split: placeholder", "split: off\n  image_column: 010\n"
                                             "  eval_dataset: null\n  label_column: yes"))
    cfg = load_train_config(["--config", str(path)])
    assert (cfg.data.split, cfg.data.image_column, cfg.data.label_column) == ("off", "010", "yes")
    assert cfg.data.eval_dataset is None and cfg.data.streaming is False  # null and booleans keep their meaning
    assert load_train_config(["data.streaming=on"]).data.streaming is True
