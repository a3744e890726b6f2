"""A job runs only its notebook's job: the `#| export` cells, the parameters and the cells marked `#| job`
(nlpmt.notebook_job). The examples and tests of a stage notebook stay out of its jobs, a notebook without
markers runs whole, and every stage notebook's job cells work without the cells a job skips."""
import builtins, json, re, subprocess, sys, symtable
from pathlib import Path
import nbformat, pytest
from nlpmt.stages import STAGES
from nlpmt.notebook_job import JOB_DIRECTIVE, SKIP_TAG, cell_directives, cell_source, is_job_notebook, runs_in_job

ROOT = Path(__file__).resolve().parents[1]
KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}


def stage_cells(name: str) -> list[dict]:
    return json.loads((ROOT/"nbs"/STAGES[name].notebook).read_text())["cells"]


def undefined_names(source: str) -> set[str]:
    "Global names `source` reads but never binds (imports, assignments, defs, loop targets), builtins excepted."
    table = symtable.symtable(source, "<job>", "exec")
    bound = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    read = {s.get_name() for s in table.get_symbols() if s.is_referenced()}
    def globals_read(t):
        for child in t.get_children():
            read.update(s.get_name() for s in child.get_symbols() if s.is_global() and s.is_referenced())
            globals_read(child)
    globals_read(table)
    return read - bound - set(dir(builtins)) - {"display", "get_ipython"}   # IPython's kernel builtins


def job_source(cells: list[dict]) -> str:
    "The code a job of this notebook runs, as one module (`from __future__` lines and magics left out)."
    code = [cell_source(c) for c in cells if c["cell_type"] == "code" and runs_in_job(c)]
    return "\n".join(l for src in code for l in src.splitlines()
                     if not l.startswith(("from __future__", "%", "!")))


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_notebook_marks_its_job_cells_after_the_parameters(name):
    cells = stage_cells(name)
    assert is_job_notebook({"cells": cells}), f"{name}: no cell marked `#| job`"
    code = [c for c in cells if c["cell_type"] == "code"]
    params = next(i for i, c in enumerate(code) if "parameters" in c["metadata"].get("tags", []))
    job = [i for i, c in enumerate(code) if JOB_DIRECTIVE in cell_directives(cell_source(c))]
    assert min(job) > params, f"{name}: a `#| job` cell comes before the parameters cell"
    skipped = [c for c in code if not runs_in_job(c)]
    assert skipped, f"{name}: a job runs every cell: the examples are not told apart"


@pytest.mark.parametrize("name", list(STAGES))
def test_job_cells_use_only_names_the_job_defines(name):
    "A job cell that used an import or helper of an example cell would fail in every job (the example is skipped)."
    missing = undefined_names(job_source(stage_cells(name)))
    assert not missing, f"{STAGES[name].notebook}: job cells use {sorted(missing)}, which only skipped cells define"


def test_the_name_check_finds_what_only_an_example_defines():
    cells = [nbformat.v4.new_code_cell("#| export\nimport json\ndef f(x): return json.dumps(x)"),
             nbformat.v4.new_code_cell("from fastcore.test import test_eq\nhelper = 1"),
             nbformat.v4.new_code_cell("#| job\nfor k in range(2): print(f(k), helper, [test_eq for _ in 'a'])")]
    test_eq = lambda a, b: a == b or pytest.fail(f"{a} != {b}")
    test_eq(undefined_names(job_source(cells)), {"helper", "test_eq"})


def write_notebook(path: Path, job_marker: str) -> Path:
    "A stage-like notebook: a definition, an example that prints, the parameters, a job cell (marked or not)."
    nb = nbformat.v4.new_notebook(metadata=KERNEL, cells=[
        nbformat.v4.new_markdown_cell("# A stage"),
        nbformat.v4.new_code_cell("#| export\ndef double(x): return 2 * x"),
        nbformat.v4.new_code_cell('print("EXAMPLE OUTPUT", double(2))'),
        nbformat.v4.new_code_cell('store = ""  # where results go\nn = 1  # a number', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(job_marker + 'print("JOB OUTPUT", double(n))')])
    nbformat.write(nb, str(path))
    return path


def run_runner(notebook: Path, store: Path, run_id: str) -> tuple[subprocess.CompletedProcess, dict]:
    "Run `python -m nlpmt.runner` on a notebook; the process and the executed notebook it left in the store."
    proc = subprocess.run([sys.executable, "-m", "nlpmt.runner", "--stage", str(notebook), "--store", str(store),
                           "--run-id", run_id, "-p", "n", "21"], capture_output=True, text=True, timeout=300)
    executed = json.loads((store/"results"/"notebooks"/run_id/f"{notebook.stem}.ipynb").read_text())
    return proc, executed


def outputs_of(nb: dict) -> str:
    return json.dumps([c.get("outputs", []) for c in nb["cells"]])


def test_a_job_skips_the_example_cells_in_its_log_and_its_executed_notebook(tmp_path):
    proc, executed = run_runner(write_notebook(tmp_path/"stage.ipynb", "#| job\n"), tmp_path/"store", "marked")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "JOB OUTPUT 42" in log and "EXAMPLE OUTPUT" not in log
    assert "code cell 1/4" in log and "code cell 2/4" not in log and "code cell 4/4" in log   # source numbering
    assert "1 example/test cells skipped" in log
    assert "JOB OUTPUT 42" in outputs_of(executed) and "EXAMPLE OUTPUT" not in outputs_of(executed)
    example = next(c for c in executed["cells"] if "EXAMPLE OUTPUT" in cell_source(c))
    assert SKIP_TAG in example["metadata"]["tags"] and example["outputs"] == []
    assert example["metadata"]["papermill"]["status"] == "skipped"
    assert executed["cells"][1]["cell_type"] == "markdown" and "Run as an nlpmt job" in cell_source(executed["cells"][1])


def test_a_notebook_without_markers_runs_whole(tmp_path):
    proc, executed = run_runner(write_notebook(tmp_path/"plain.ipynb", ""), tmp_path/"store", "plain")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "EXAMPLE OUTPUT 4" in log and "JOB OUTPUT 42" in log and "code cell 2/4" in log and "skipped" not in log
    assert "EXAMPLE OUTPUT 4" in outputs_of(executed)
    assert not any(SKIP_TAG in c["metadata"].get("tags", []) for c in executed["cells"])
    assert not any("Run as an nlpmt job" in cell_source(c) for c in executed["cells"])


def test_a_failing_job_cell_is_named_by_its_number_in_the_source_notebook(tmp_path):
    nb = write_notebook(tmp_path/"broken.ipynb", "#| job\nraise ValueError('broken job')\n")
    proc, executed = run_runner(nb, tmp_path/"store", "broken")
    assert proc.returncode == 1
    assert re.search(r"failed in code cell 4, id [^:]+: `raise ValueError\('broken job'\)`: ValueError: broken job",
                     proc.stderr), proc.stderr


def test_the_data_stage_job_runs_none_of_its_examples(tmp_path):
    "The real data stage: its examples print their own demo stores and drop counts; a job shows none of that."
    cells = stage_cells("data")
    examples = [cell_source(c) for c in cells if c["cell_type"] == "code" and not runs_in_job(c)]
    assert any("prepare_demo_data(_demo_store" in s for s in examples)           # an example that makes a demo store
    raw = tmp_path/"raw.csv"
    raw.write_text("text,label\n" + "".join(f"{w} story number {i} about {w}s,{w}\n"
                                             for i in range(40) for w in ("sport", "money", "science")))
    proc = subprocess.run([sys.executable, "-m", "nlpmt.runner", "--stage", "data", "--store", str(tmp_path/"store"),
                           "--run-id", "d1", "-p", "raw_path", str(raw)], capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "train_3class.csv  (84 rows)" in log and "example/test cells skipped" in log
    assert "'source': 'sample'" not in log and "kept 24 of 30 rows" not in log          # the examples' outputs
    executed = json.loads((tmp_path/"store/results/notebooks/d1/data.ipynb").read_text())
    ran = [c for c in executed["cells"] if c["cell_type"] == "code" and c.get("execution_count")]
    assert ran and all(runs_in_job(c) for c in ran)
    assert all(c["outputs"] == [] for c in executed["cells"] if SKIP_TAG in c["metadata"].get("tags", []))
