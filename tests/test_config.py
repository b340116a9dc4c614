"""fastrlhf.config: YAML + key=value overrides into frozen dataclasses, with errors that name their source."""
from dataclasses import dataclass, field

import pytest

from fastrlhf.config import ConfigError, load_config


@dataclass(frozen=True)
class Section:
    backend: str = "hf"
    temperature: float = 1.0


@dataclass(frozen=True)
class Cfg:
    model: str = ""
    lr: float = 1e-5
    epochs: int = 1
    heads: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    rollout: Section = field(default_factory=Section)

    def __post_init__(self):
        if not self.model:
            raise ConfigError("Cfg: 'model' is required")


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 2.0e-5\nrollout:\n  temperature: 0.7\n")
    return path


def test_file_and_overrides_merge(yaml_file):
    cfg = load_config(Cfg, yaml_file, ["model=m", "epochs=3", "rollout.backend=vllm", "heads=[a, b]",
                                       "weights=[1, 2]"])
    assert (cfg.model, cfg.lr, cfg.epochs) == ("m", 2e-5, 3)
    assert cfg.rollout == Section(backend="vllm", temperature=0.7)
    assert cfg.heads == ("a", "b") and cfg.weights == (1.0, 2.0)


def test_a_required_key_may_come_from_the_command_line(yaml_file):
    assert load_config(Cfg, yaml_file, ["model=m"]).model == "m"
    with pytest.raises(ConfigError, match="'model' is required"):
        load_config(Cfg, yaml_file)


@pytest.mark.parametrize("override, message", [
    ("foo=1", r"command line: unknown key\(s\) \['foo'\]"),
    ("rollout.bogus=1", r"command line.rollout: unknown key\(s\) \['bogus'\]"),
    ("lr=abc", "command line.lr: expected a number"),
    ("lr=.nan", "command line.lr: expected a finite number"),
    ("epochs=1.5", "command line.epochs: expected int"),
    ("heads=safe", "command line.heads: expected a list"),  # not ('s', 'a', 'f', 'e')
    ("weights=[1, x]", r"command line.weights\[1\]: expected a number"),
])
def test_bad_overrides_are_named_as_overrides(yaml_file, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, yaml_file, ["model=m", override])


def test_bad_file_keys_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown key\(s\) \['learning_rate'\]"):
        load_config(Cfg, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "missing.yaml")
