"""Notebook-first multi-class text classification that runs the same in JupyterLab, papermill and Amazon SageMaker

Modules:

- `nlpmt.cli`: The `nlpmt` console script. The core commands (`ls`, `sync`, `config`) live here; each stage module adds its own commands (`run`, `pipeline`, `jobs`, `predict`, `report`, `aws`, `cost`, `doctor`) through a `register_cli(subparsers)` function, imported only when its command is used so `nlpmt --help` stays fast.
- `nlpmt.core`: Everything the stages share: where the project is, the four YAML configs loaded into typed, validated objects, and the provenance record (package version, git commit, config) stored with every result.
- `nlpmt.metrics`: Every model in the project, classical or transformer, is scored by the same scikit-learn functions and written to the same JSON record (`results/{stage}/{model}_metrics.json`), so the report can compare, bootstrap and test any two of them without knowing how they were trained.
- `nlpmt.storage`: Every stage reads its inputs from, and writes its outputs to, a *store*: a local folder (the embedded default) or `s3://bucket/prefix`. Both have the same layout and the same methods, so a notebook runs unchanged on a laptop, under papermill, and inside a SageMaker job."""

__version__ = "0.1.0"
