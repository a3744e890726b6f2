"""Typed configs: named errors for bad files, and overrides from the environment and --set."""
import shutil
from pathlib import Path
import pytest, yaml
from nlpmt.core import load_config, ConfigError, CONFIG_FILES, provenance

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def config_dir(tmp_path):
    "A writable copy of the project's configs/."
    return Path(shutil.copytree(ROOT/"configs", tmp_path/"configs"))


def edit(config_dir: Path, section: str, **changes):
    path = config_dir/CONFIG_FILES[section]
    data = yaml.safe_load(path.read_text()); data.update(changes); path.write_text(yaml.safe_dump(data))
    return path


def test_project_configs_are_valid():
    cfg = load_config(ROOT/"configs")
    assert cfg.project.store == "./store" and cfg.data.min_class_rows == 10 and cfg.data.raw_path is None  # data: a profile
    assert set(cfg.baseline.models) >= {"logreg", "linear_svm"} and cfg.transformer.models


@pytest.mark.parametrize("section,changes,message", [
    ("project", {"regoin": "eu-west-1"}, "project.yaml: unknown key 'regoin'"),
    ("project", {"max_run_seconds": "a day"}, "project.yaml: max_run_seconds: expected int"),
    ("transformer", {"batch_size": 3.5}, "models_transformer.yaml: batch_size: expected int"),
    ("transformer", {"precision": "fp8"}, "models_transformer.yaml: precision: 'fp8' is not one of"),
    ("data", {"val_frac": "ten"}, "data_config.yaml: val_frac: expected float"),
    ("baseline", {"models": {"logreg": {"classifier": "logreg", "parms": {}}}},
     "models_baseline.yaml: models.logreg: unknown key 'parms'"),
])
def test_bad_config_names_file_and_key(config_dir, section, changes, message):
    edit(config_dir, section, **changes)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")): load_config(config_dir, env={})


def test_missing_required_value_and_bad_yaml(config_dir):
    path = config_dir/"models_baseline.yaml"; data = yaml.safe_load(path.read_text()); del data["models"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="models_baseline.yaml: models: required value is missing"): load_config(config_dir, env={})
    path = config_dir/"data_config.yaml"
    path.write_text("raw_path: [unclosed")
    with pytest.raises(ConfigError, match="data_config.yaml: not valid YAML"): load_config(config_dir, env={})
    (config_dir/"project.yaml").unlink()
    with pytest.raises(ConfigError, match="project.yaml: config file not found"): load_config(config_dir, env={})


def test_overrides_env_then_cli(config_dir):
    env = {"NLPMT_STORE": "s3://bucket/p", "NLPMT_TRANSFORMER__EPOCHS": "2", "NLPMT_PROJECT__USE_SPOT": "false"}
    cfg = load_config(config_dir, overrides=["transformer.epochs=4", "transformer.models=[roberta-base, bert-base-uncased]"], env=env)
    assert cfg.project.store == "s3://bucket/p" and cfg.project.use_spot is False
    assert cfg.transformer.epochs == 4.0 and cfg.transformer.models == ["roberta-base", "bert-base-uncased"]
    with pytest.raises(ConfigError, match="with overrides.*max_length: expected int"):
        load_config(config_dir, env={"NLPMT_TRANSFORMER__MAX_LENGTH": "long"})
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"): load_config(config_dir, overrides=["epochs=3"], env={})


def test_effective_config_is_recorded(config_dir):
    cfg = load_config(config_dir, overrides=["data.seed=7"], env={})
    rec = provenance(cfg)
    assert rec["config"]["data"]["seed"] == 7 and rec["package_version"] and rec["git_commit"] and rec["timestamp"]
