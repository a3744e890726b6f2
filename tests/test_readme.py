"""The README and nbs/index.ipynb (its nbdev source) say the same thing, and its commands are the real ones."""
import json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_matches_index_notebook():
    nb = json.loads((ROOT/"nbs/index.ipynb").read_text())
    text = "\n\n".join("".join(c["source"]).strip("\n") for c in nb["cells"] if c["cell_type"] == "markdown")
    assert text.strip() == (ROOT/"README.md").read_text().strip()


def test_readme_setup_commands_are_what_ci_runs():
    readme = (ROOT/"README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    setup = blocks[0].strip().splitlines()
    assert len(setup) == 2 and "pip install" in setup[0] and setup[1] == "bash .ci/run"
    assert blocks[1].strip() == "nlpmt pipeline"
    assert "pytest" in (ROOT/".ci/run").read_text()
