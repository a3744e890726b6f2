"""One place per concept: the stage, classifier and raw-format registries are the only lists, and the command
line, the config, the notebooks and every module that needs such a list agree with them."""
import json, re, subprocess, sys, typing
from pathlib import Path
import pytest, yaml
from nlpmt.stages import STAGES, stage_names, training_stages, metric_stages, model_loaders
from nlpmt.classifiers import CLASSIFIERS
from nlpmt.formats import format_names
from nlpmt.core import SECTIONS, CONFIG_FILES, BaselineModelConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def notebook_cells(name: str) -> list[dict]:
    return json.loads((ROOT/"nbs"/name).read_text())["cells"]


def parameters_source(name: str) -> str:
    cells = [c for c in notebook_cells(name) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged `parameters`, found {len(cells)}"
    return "".join(cells[0]["source"])


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_is_a_papermill_notebook_with_a_known_config_section(name):
    spec = STAGES[name]
    assert (ROOT/"nbs"/spec.notebook).is_file(), f"stage {name}: nbs/{spec.notebook} is missing"
    assert parameters_source(spec.notebook).strip()
    assert spec.section is None or spec.section in SECTIONS, f"stage {name}: config section {spec.section!r}"
    assert spec.section is None or spec.section in CONFIG_FILES


def test_modules_read_the_stage_registry():
    from nlpmt import runner, jobs, job_plan, metrics, predict, fingerprint
    assert runner.STAGES == jobs.PIPELINE == stage_names()
    assert job_plan.TRAINING_STAGES == training_stages() == ("transformer",)
    assert metrics.STAGES == metric_stages()
    assert predict.LOADERS == model_loaders()
    assert fingerprint.UPSTREAM == {"report": ("baseline", "transformer")}
    assert set(fingerprint.OUTPUT_PREFIXES) == set(STAGES)
    for name, spec in STAGES.items():
        assert runner.stage_notebook(name).name == spec.notebook
        if spec.model_module: assert hasattr(__import__(spec.model_module, fromlist=["load_predictor"]), "load_predictor")


def test_no_module_spells_out_the_stage_list():
    "Only the registry names the stages together: a tuple or dict of two stage names elsewhere is a second list."
    names = "|".join(STAGES)
    pattern = re.compile(rf"""["']({names})["']\s*[,:]\s*[("']*\s*["']({names})["']""")
    offenders = [f"{p.name}: {m.group(0)}" for p in sorted((ROOT/"nlpmt").glob("*.py"))
                 if p.name not in ("stages.py", "_modidx.py") for m in pattern.finditer(p.read_text())]
    assert not offenders, offenders


def test_cli_offers_the_registered_stages():
    out = subprocess.run([sys.executable, "-c", "import sys; from nlpmt.cli import main; sys.exit(main(['run', '--help']))"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert ", ".join(STAGES) in " ".join(out.stdout.split())


def test_classifier_choices_come_from_the_registry():
    literal = typing.get_args(typing.get_type_hints(BaselineModelConfig)["classifier"])
    assert literal == tuple(CLASSIFIERS)
    configured = yaml.safe_load((ROOT/"configs"/CONFIG_FILES["baseline"]).read_text())["models"]
    assert {m["classifier"] for m in configured.values()} <= set(CLASSIFIERS)
    assert "complement_nb" in CLASSIFIERS and "complement_nb" in load_config(ROOT/"configs").baseline.models


def test_raw_format_choices_agree_everywhere():
    "The data notebook's parameter comment and the config's field comment list exactly the registered formats."
    names = format_names()                          # "auto" and every registered format
    comment = re.search(r"^raw_format\s*=.*#\s*(.+)$", parameters_source(STAGES["data"].notebook), re.M).group(1)
    assert re.findall(r"[a-z]+", comment.split(";")[0]) == names
    core_src = (ROOT/"nlpmt"/"core.py").read_text()
    listed = re.search(r"raw_format: str = .*FORMATS \(([^)]*)\)", core_src).group(1)
    assert ["auto", *(s.strip() for s in listed.split(","))] == format_names()
    assert "parquet" in format_names()
