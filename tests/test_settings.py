"""Every setting is declared once: a stage's parameters in its settings dataclass (`nlpmt.settings`), a config
value in its config dataclass (`nlpmt.core`). These tests fail on any drift between those declarations and
their copies: the stage notebooks' `parameters` cells (names, order, defaults, help comments, layout), the
YAML files' values, the config's types, the report command's defaults and the command-line flags."""
import argparse, dataclasses, json, re, shutil, subprocess, sys, typing
from dataclasses import fields
from pathlib import Path
from typing import Optional
import pytest, yaml
from nlpmt.core import CONFIG_FILES, SECTIONS, load_config
from nlpmt.stages import STAGES
from nlpmt.settings import (ParameterError, TransformerSettings, DataSettings, ReportSettings, add_settings_arguments,
                            check_parameters, config_overrides, field_help, notebook_parameters, parameters_cell,
                            parameters_cell_problems, settings_from, settings_from_args, settings_problems,
                            settings_types, stage_settings, type_label, write_parameters_cell)

ROOT = Path(__file__).resolve().parents[1]

# values the YAML files set on purpose to something else than the dataclass default (project data, not defaults)
DELIBERATE = {("project", "tags"), ("transformer", "model_overrides")}


@pytest.mark.parametrize("stage", list(STAGES))
def test_parameters_cell_is_generated_from_the_stage_settings(stage):
    cls = stage_settings(stage)
    assert cls is not None, f"stage {stage}: no settings dataclass (StageSpec.settings)"
    assert parameters_cell_problems(ROOT/"nbs"/STAGES[stage].notebook, cls) == []


@pytest.mark.parametrize("stage", list(STAGES))
def test_settings_are_complete_and_their_defaults_fit_their_types(stage):
    cls = stage_settings(stage)
    assert settings_problems(cls) == []
    assert set(cls.config_fields) <= {f.name for f in fields(cls)}, cls.config_fields


def _drifted(tmp_path, change) -> Path:
    "A copy of the transformer notebook whose parameters cell lines went through `change`."
    path = tmp_path/"04_transformer.ipynb"
    shutil.copy(ROOT/"nbs"/"04_transformer.ipynb", path)
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    cell["source"] = change("".join(cell["source"]).splitlines(keepends=True))
    path.write_text(json.dumps(nb))
    return path


@pytest.mark.parametrize("change, expected", [
    (lambda ls: [l.replace("epochs = None", "epochs = 0.0") for l in ls], "'epochs': default 0.0 in the cell, None"),
    (lambda ls: [l.replace("training epochs;", "epochs to train;") for l in ls], "'epochs': comment 'epochs to train;"),
    (lambda ls: [l for l in ls if not l.startswith("seed ")], "'seed' of TransformerSettings is missing"),
    (lambda ls: ls + ["\nwarmup = 0.1  # warm-up share"], "'warmup' is not a field of TransformerSettings"),
    (lambda ls: ls[1:2] + ls[:1] + ls[2:], "not in the order of TransformerSettings"),
    (lambda ls: [l.replace("epochs = None          #", "epochs = None #") for l in ls], "not laid out as generated"),
])
def test_any_drift_of_a_parameters_cell_is_named(tmp_path, change, expected):
    path = _drifted(tmp_path, change)
    problems = parameters_cell_problems(path, TransformerSettings)
    assert any(expected in p for p in problems), problems
    write_parameters_cell(path, TransformerSettings)                 # the fix is one call
    assert parameters_cell_problems(path, TransformerSettings) == []


def test_a_settings_default_that_does_not_fit_its_type_is_named():
    @dataclasses.dataclass
    class Bad:
        rows: Optional[int] = dataclasses.field(default="many", metadata={"help": "rows"})
        quiet: bool = dataclasses.field(default=False)
    assert settings_problems(Bad) == ["Bad.rows: default 'many' is not a int", "Bad.quiet: no help text"]


def _config_type(stage):
    "Field name -> type of what a stage's `config_fields` override (the transformer: its `TrainParams`)."
    if stage == "transformer":
        from nlpmt.transformer import TrainParams
        return typing.get_type_hints(TrainParams)
    return typing.get_type_hints(SECTIONS[STAGES[stage].section]) if STAGES[stage].section else {}


@pytest.mark.parametrize("stage", list(STAGES))
def test_config_overrides_have_the_config_fields_types(stage):
    "A parameter that overrides a config value has that value's type (or Optional of it: None = the config's)."
    cls, config = stage_settings(stage), _config_type(stage)
    hints = settings_types(cls)
    for name in cls.config_fields:
        assert name in config, f"{cls.__name__}.{name} overrides no config field"
        assert hints[name] in (config[name], Optional[config[name]]), \
            f"{cls.__name__}.{name}: {type_label(hints[name])} vs the config's {type_label(config[name])}"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_yaml_files_repeat_the_dataclass_defaults(section):
    "A value the YAML file sets equals the config dataclass's default (except the deliberate ones above)."
    raw = yaml.safe_load((ROOT/"configs"/CONFIG_FILES[section]).read_text()) or {}
    config = getattr(load_config(ROOT/"configs", env={}), section)
    drift = []
    for f in fields(SECTIONS[section]):
        if f.name not in raw or (section, f.name) in DELIBERATE: continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING: continue   # required value
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if getattr(config, f.name) != default:
            drift.append(f"{CONFIG_FILES[section]}: {f.name} is {getattr(config, f.name)!r}, {SECTIONS[section].__name__} "
                         f"says {default!r}")
    assert not drift, drift
    for section_, name in DELIBERATE: assert name in {f.name for f in fields(SECTIONS[section_])}


def test_report_command_defaults_are_the_report_settings():
    from nlpmt.report import DEFAULT_N_BOOTSTRAP, DEFAULT_SEED
    assert (ReportSettings().n_bootstrap, ReportSettings().seed) == (DEFAULT_N_BOOTSTRAP, DEFAULT_SEED)


def _command(name: str) -> argparse.ArgumentParser:
    "The parser of `nlpmt NAME` (its module registered, as `main` does)."
    from nlpmt.cli import build_parser
    sub = next(a for a in build_parser([name])._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _parsers(parser: argparse.ArgumentParser):
    "`parser` and every subcommand parser below it."
    yield parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for child in dict.fromkeys(a.choices.values()): yield from _parsers(child)


def _options(parser: argparse.ArgumentParser, dests) -> dict:
    "Option string -> (dest, help, default) of the parser's options that fill one of `dests`."
    return {o: (a.dest, a.help, a.default) for a in parser._actions if a.dest in dests for o in a.option_strings}


def test_project_flags_name_project_fields_and_read_the_same_in_every_command():
    "`nlpmt run`, `pipeline` and `sweep` take every project flag, `report` only --store, each as `PROJECT_FLAGS` declares it."
    from nlpmt.core import ProjectConfig
    from nlpmt.settings import PROJECT_FLAGS, add_project_arguments
    project_fields = {f.name for f in fields(ProjectConfig)}
    for flag in PROJECT_FLAGS: assert flag.project_fields and set(flag.project_fields) <= project_fields, flag
    dests = {f.dest for f in PROJECT_FLAGS}
    declared = argparse.ArgumentParser(); add_project_arguments(declared)
    expected = _options(declared, dests)
    assert set(expected) == {f.flag for f in PROJECT_FLAGS} | {"--no-spot"}
    for command in ("run", "pipeline", "sweep"): assert _options(_command(command), dests) == expected, command
    assert _options(_command("report"), dests) == {"--store": expected["--store"]}


def test_every_project_key_a_help_names_exists():
    "A `project.KEY` in any command's help (run, sweep, aws, ...) names a `ProjectConfig` field."
    from nlpmt.cli import PLUGIN_COMMANDS
    from nlpmt.core import ProjectConfig
    project_fields, named = {f.name for f in fields(ProjectConfig)}, set()
    for command in ["ls", "sync", "config", *PLUGIN_COMMANDS]:
        for parser in _parsers(_command(command)):
            texts = [parser.description or ""] + [a.help or "" for a in parser._actions]
            named |= {(command, k) for t in texts for k in re.findall(r"(?<![\w/])project\.(\w+)", t) if k != "yaml"}
    assert {k for _, k in named} >= {"store", "role_arn", "use_spot", "training_instance_type"}
    assert [(c, k) for c, k in sorted(named) if k not in project_fields] == []


def test_report_flags_are_the_report_settings():
    args = _command("report").parse_args([])
    assert settings_from_args(ReportSettings, args) == ReportSettings()
    args = _command("report").parse_args(["--store", "s3://b/p", "--allow-mixed-data", "--n-bootstrap", "200", "--seed", "3"])
    assert settings_from_args(ReportSettings, args) == ReportSettings(store="s3://b/p", allow_mixed_data=True, n_bootstrap=200, seed=3)


def test_stage_notebook_parameters_are_typed_by_the_dataclass():
    params = notebook_parameters(ROOT/"nbs"/"04_transformer.ipynb")
    assert check_parameters({"epochs": "2", "max_length": "auto", "seed": "", "precision": "bf16"}, params) == \
        {"epochs": 2.0, "max_length": "auto", "seed": None, "precision": "bf16"}
    with pytest.raises(ParameterError, match=r"parameter 'precision' \('auto' \| 'bf16' \| 'fp16' \| 'fp32', default None\)"):
        check_parameters({"precision": "fp8"}, params)
    data = notebook_parameters(ROOT/"nbs"/"02_data.ipynb")
    assert check_parameters({"text_fields": "title,description", "seed": "7", "csv_header": "false"}, data) == \
        {"text_fields": ["title", "description"], "seed": 7, "csv_header": False}
    other = notebook_parameters(ROOT/"tests"/"notebooks"/"ok.ipynb")   # not a stage: types from the defaults
    assert check_parameters({"n_rows": "3", "message": "12"}, other) == {"n_rows": 3, "message": "12"}


def test_every_field_is_a_typed_flag_with_its_help():
    p = argparse.ArgumentParser(exit_on_error=False)
    add_settings_arguments(p, TransformerSettings)
    text = " ".join(p.format_help().split())
    for f in fields(TransformerSettings):
        assert f"--{f.name}" in text and " ".join(field_help(f).split()) in text, f.name
    args = p.parse_args(["--epochs", "2", "--max-train-rows", "0", "--class_weight", "none"])
    settings = settings_from_args(TransformerSettings, args)
    assert config_overrides(settings) == {"epochs": 2.0, "max_train_rows": 0, "class_weight": "none", "max_steps": 0}


def test_notebook_values_are_checked_against_the_dataclass():
    assert settings_from(DataSettings, {"seed": "7", "columns": "a,b", "store": ""}) == DataSettings(seed=7, columns=["a", "b"])
    with pytest.raises(ParameterError, match=r"val_frac \(float\)"):
        settings_from(DataSettings, {"val_frac": "a tenth"})


def test_cli_help_lists_the_stage_parameters_and_p_still_works(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import sys; from nlpmt.cli import main; "
                          "sys.exit(main(['run', 'transformer', '--help']))"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for f in fields(TransformerSettings):
        assert f"  {f.name}: " in out.stdout and field_help(f) in out.stdout, f.name
    train = subprocess.run([sys.executable, "-m", "nlpmt.train", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert train.returncode == 0 and "--max_train_rows" in train.stdout and "--learning-rate" in train.stdout, train.stderr
    from nlpmt.jobs import plan_jobs
    spec, = plan_jobs("transformer", {"epochs": "2", "max_train_rows": "0"}, store=str(tmp_path),
                      config=load_config(ROOT/"configs"), overrides=["transformer.epochs=3"])
    assert (spec.params["epochs"], spec.params["max_train_rows"]) == (2.0, 0)


def test_train_script_trains_the_stage_from_its_flags(tmp_path):
    "`python -m nlpmt.train --store ...` trains what the notebook would for the same parameters (a real MiniLM run)."
    from nlpmt.data import prepare_demo_data
    prepare_demo_data(str(tmp_path), rows=200)
    flags = ["--store", str(tmp_path), "--max_train_rows", "40", "--max-length", "32", "--batch_size", "8",
             "--num_threads", "1", "--epochs", "1"]
    out = subprocess.run([sys.executable, "-m", "nlpmt.train", *flags], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((tmp_path/"results"/"transformer"/"all-minilm-l6-v2_metrics.json").read_text())
    assert record["train_rows"] == 40, record["train_rows"]
    bad = subprocess.run([sys.executable, "-m", "nlpmt.train", "--store", str(tmp_path), "--batch_size", "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert bad.returncode == 1 and "transformer.batch_size: must be > 0" in bad.stderr, bad.stderr[-2000:]
