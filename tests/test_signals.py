"""Stopping local jobs (issue 11, bad 1 and 4): SIGTERM, SIGKILL and SIGHUP on `nlpmt run`, Ctrl-C reaching a command
that a non-interactive script started in the background, detached jobs. Real CLI processes, real runner and kernel
processes; the fast tests use the `sleep` fixture notebook, the slow ones train a tiny random BERT."""
import json, os, shutil, signal, subprocess, sys, time, uuid
from pathlib import Path
import pytest
from nlpmt.storage import LocalStore

ROOT = Path(__file__).resolve().parents[1]
SLEEP = str(ROOT/"tests"/"notebooks"/"sleep.ipynb")
NLPMT = str(Path(sys.executable).parent/"nlpmt")


def job_processes(tag: str) -> list[tuple[int, str]]:
    "Processes (pid, command line) whose environment carries `NLPMT_TEST_TAG=tag`: the CLI, runner and kernel of one test."
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid(): continue
        try:
            if f"NLPMT_TEST_TAG={tag}".encode() not in (entry/"environ").read_bytes().split(b"\0"): continue
            status = (entry/"status").read_text()
            if "\nState:\tZ" in status: continue          # a zombie runs nothing (it waits for its parent to reap it)
            found.append((int(entry.name), (entry/"cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]))
        except OSError: continue
    return found


def wait_until_gone(tag: str, timeout: float = 30.0) -> list:
    "Wait until no process of the job is left (at most `timeout` s); returns those still alive."
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = job_processes(tag)
        if not left: return []
        time.sleep(0.2)
    return job_processes(tag)


def kill_job(tag: str) -> None:
    "Clean up after a failed test: SIGKILL whatever of the job is left."
    for pid, _ in job_processes(tag):
        try: os.kill(pid, signal.SIGKILL)
        except OSError: pass


class Cli:
    "`nlpmt ARGS` in a subprocess whose output goes to a file, tagged so its descendants can be found."
    def __init__(self, tmp: Path, args: list, **popen):
        self.tag, self.tmpdir, self.out_path = uuid.uuid4().hex, tmp/"tmpdir", tmp/f"cli-{uuid.uuid4().hex[:6]}.out"
        self.tmpdir.mkdir(exist_ok=True)
        env = {**os.environ, "NLPMT_TEST_TAG": self.tag, "TMPDIR": str(self.tmpdir), "PYTHONUNBUFFERED": "1"}
        self.out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(args, env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=subprocess.STDOUT, **popen)

    def text(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 180.0) -> None:
        "Wait until the output shows `pattern`."
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pattern in self.text(): return
            if self.proc.poll() is not None: break
            time.sleep(0.05)
        kill_job(self.tag); pytest.fail(f"{pattern!r} never appeared:\n{self.text()[-4000:]}")

    def job_folders(self) -> list:
        return sorted(p.name for p in self.tmpdir.glob("nlpmt-job-*"))

    def close(self):
        kill_job(self.tag); self.out.close()


def only_run(store: Path) -> Path:
    "The one run folder in `results/notebooks`."
    (run_dir,) = (store/"results"/"notebooks").iterdir()
    return run_dir


def assert_stopped_cleanly(cli: Cli, store: Path, name: str, why: str) -> None:
    "No process left within 30 s, the store records Stopped with the partial notebook and the log, no job folder left."
    left = wait_until_gone(cli.tag)
    assert not left, f"job processes still alive 30 s after {why}: {left}"
    run_dir = only_run(store)
    record = json.loads((run_dir/f"{name}.json").read_text())
    assert record["status"] == "Stopped", record
    assert "stopped by SIGTERM" in record["failure"]
    assert (run_dir/f"{name}.ipynb").exists() and (run_dir/f"{name}.log").exists()
    assert cli.job_folders() == [], cli.job_folders()              # /tmp/nlpmt-job-* removed


# ---------------------------------------------------------------- fast: the sleep fixture notebook

def test_sigterm_on_nlpmt_run_stops_the_job_like_ctrl_c(tmp_path):
    store = tmp_path/"store"
    cli = Cli(tmp_path, [NLPMT, "run", SLEEP, "--store", str(store)])
    try:
        cli.wait_for("training started")
        cli.proc.send_signal(signal.SIGTERM)
        assert cli.proc.wait(90) == 143, cli.text()
        out = cli.text()
        assert "SIGTERM sent" in out and "Stopped" in out
        assert_stopped_cleanly(cli, store, "sleep", "SIGTERM")
        assert (store/"models"/"checkpoints"/"checkpoint.txt").read_text() == "step 1\n"   # the stage checkpointed
    finally: cli.close()


def test_sigkill_on_nlpmt_run_stops_the_orphaned_job(tmp_path):
    "Nothing runs in a SIGKILLed command: the job notices (parent-watch pipe), checkpoints, saves its log, cleans up."
    store = tmp_path/"store"
    cli = Cli(tmp_path, [NLPMT, "run", SLEEP, "--store", str(store)])
    try:
        cli.wait_for("training started")
        assert len(cli.job_folders()) == 1 and len(job_processes(cli.tag)) >= 3   # the CLI, the runner and the kernel
        cli.proc.kill(); cli.proc.wait(10)
        assert_stopped_cleanly(cli, store, "sleep", "SIGKILL")
        assert (store/"models"/"checkpoints"/"checkpoint.txt").read_text() == "step 1\n"
        log = (only_run(store)/"sleep.log").read_text()
        assert "training started" in log and "the nlpmt command that started this job is gone" in log
        assert "BrokenPipeError" not in log
    finally: cli.close()


def sighup_ignored(pid: int) -> bool:
    "Whether process `pid` ignores SIGHUP (its `SigIgn` mask)."
    mask = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("SigIgn:")).split()[1]
    return bool(int(mask, 16) & (1 << (signal.SIGHUP - 1)))


def with_sighup(disposition: str, args: list) -> list:
    """`args` exec'd with SIGHUP at its default action ("default": a terminal session) or ignored ("ignore": `nohup`),
    whatever this test process has: an ignored SIGHUP is inherited (pytest under nohup or a CI runner that ignores
    it), and `nlpmt` then rightly keeps ignoring it, so the test must not depend on how pytest was started."""
    action = "SIG_DFL" if disposition == "default" else "SIG_IGN"
    reset = f"import os, signal, sys; signal.signal(signal.SIGHUP, signal.{action}); os.execv(sys.argv[1], sys.argv[1:])"
    return [sys.executable, "-c", reset, *args]


def test_sighup_closing_the_terminal_stops_the_job(tmp_path):
    store = tmp_path/"store"
    cli = Cli(tmp_path, with_sighup("default", [NLPMT, "run", SLEEP, "--store", str(store)]))
    try:
        cli.wait_for("training started")
        assert not sighup_ignored(cli.proc.pid)                       # a terminal session's command
        cli.proc.send_signal(signal.SIGHUP)
        assert cli.proc.wait(90) == 129, cli.text()
        assert_stopped_cleanly(cli, store, "sleep", "SIGHUP")
    finally: cli.close()


def test_under_nohup_sighup_stays_ignored_and_the_job_runs_to_its_end(tmp_path):
    "`nohup nlpmt run ...`: closing the terminal must not stop the job (install_stop_handlers keeps an ignored SIGHUP)."
    store = tmp_path/"store"
    cli = Cli(tmp_path, with_sighup("ignore", [NLPMT, "run", SLEEP, "--store", str(store), "-p", "seconds", "3"]))
    try:
        cli.wait_for("training started")
        assert sighup_ignored(cli.proc.pid)
        cli.proc.send_signal(signal.SIGHUP)
        assert cli.proc.wait(120) == 0, cli.text()
        assert "training finished" in cli.text() and "SIGTERM sent" not in cli.text()
        assert json.loads((only_run(store)/"sleep.json").read_text())["status"] == "Completed"
    finally: cli.close()


def test_background_child_of_a_script_ignores_sigint_unless_nlpmt_installs_its_own():
    "The premise of bad 4: a non-interactive shell starts `cmd &` with SIGINT ignored, and Python keeps it ignored."
    probe = "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"
    out = subprocess.run(["bash", "-c", f"{sys.executable} -c '{probe}' & wait"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=60).stdout
    assert out.split() == ["True"], out
    probe = ("import signal; from nlpmt.supervise import install_stop_handlers, _raise_stop; install_stop_handlers(); "
             "print(signal.getsignal(signal.SIGINT) is _raise_stop, signal.getsignal(signal.SIGTERM) is _raise_stop)")
    out = subprocess.run(["bash", "-c", f"{sys.executable} -c '{probe}' & wait"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=60, cwd=ROOT).stdout
    assert out.split() == ["True", "True"], out


def test_ctrl_c_stops_a_job_started_in_the_background_by_a_script(tmp_path):
    "`bash -c 'nlpmt run ... &'`: the command starts with SIGINT ignored and still stops its job on SIGINT."
    store = tmp_path/"store"
    pid_file = tmp_path/"pid"
    script = f"{NLPMT} run {SLEEP} --store {store} & echo $! > {pid_file}; wait $!; echo \"exit=$?\""
    cli = Cli(tmp_path, ["bash", "-c", script])
    try:
        cli.wait_for("training started")
        pid = int(pid_file.read_text())
        sigignored = int(next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines()
                              if l.startswith("SigIgn:")).split()[1], 16)
        assert not sigignored & (1 << (signal.SIGINT - 1)), "nlpmt kept the inherited SIG_IGN for SIGINT"
        os.kill(pid, signal.SIGINT)
        assert cli.proc.wait(90) == 0, cli.text()
        out = cli.text()
        assert "exit=130" in out and "SIGTERM sent" in out and "stopped by SIGTERM in code cell 3" in out
        assert_stopped_cleanly(cli, store, "sleep", "SIGINT")
    finally: cli.close()


def test_detached_job_outlives_the_command_and_finishes_its_own_bookkeeping(tmp_path):
    store = tmp_path/"store"
    cli = Cli(tmp_path, [NLPMT, "run", SLEEP, "--store", str(store), "-p", "seconds", "3", "--detach"])
    try:
        assert cli.proc.wait(120) == 0, cli.text()
        out = cli.text()
        assert "runs detached as process" in out and "kill -TERM" in out
        assert job_processes(cli.tag), "the detached job ended with the command"
        assert not wait_until_gone(cli.tag, timeout=120)
        run_dir = only_run(store)
        assert json.loads((run_dir/"sleep.json").read_text())["status"] == "Completed"
        assert "training finished" in (run_dir/"sleep.log").read_text()
        assert cli.job_folders() == []
    finally: cli.close()
    ok = str(ROOT/"tests"/"notebooks"/"ok.ipynb")
    bad = subprocess.run([NLPMT, "run", ok, "--store", str(store), "--detach", "--models", "a", "b"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 1 and "--detach starts one job" in bad.stderr


def test_a_detached_job_stops_cleanly_on_sigterm(tmp_path):
    "What the --detach message promises: `kill -TERM PID` checkpoints, records Stopped, uploads the log, cleans up."
    store = tmp_path/"store"
    cli = Cli(tmp_path, [NLPMT, "run", SLEEP, "--store", str(store), "--detach"])
    try:
        assert cli.proc.wait(120) == 0, cli.text()
        out = cli.text()
        pid = int(out.split("runs detached as process ")[1].split()[0])
        log = Path(out.split("log while it runs: ")[1].split()[0])
        deadline = time.time() + 120
        while "training started" not in (log.read_text() if log.exists() else "") and time.time() < deadline: time.sleep(0.1)
        os.kill(pid, signal.SIGTERM)
        assert_stopped_cleanly(cli, store, "sleep", "SIGTERM to the detached job")
        assert (store/"models"/"checkpoints"/"checkpoint.txt").read_text() == "step 1\n"
    finally: cli.close()


def test_a_runner_whose_command_is_already_gone_never_starts_the_notebook(tmp_path):
    "The runner contract alone: the parent-watch pipe is closed at once, so the notebook never runs; the job finishes itself."
    from nlpmt.supervise import write_job_plan
    opt_ml, store = tmp_path/"opt-ml", tmp_path/"store"
    opt_ml.mkdir()
    write_job_plan(opt_ml, str(store), "results/notebooks/r0/sleep.log")
    watch, alive = os.pipe(); os.close(alive)                     # the "command" died before the job started
    env = {**os.environ, "NLPMT_OPT_ML": str(opt_ml), "NLPMT_PARENT_FD": str(watch), "PYTHONUNBUFFERED": "1"}
    with open(opt_ml/"job.log", "wb") as log:
        rc = subprocess.run([sys.executable, "-m", "nlpmt.runner", "--stage", SLEEP, "--store", str(store), "--run-id", "r0"],
                            env=env, pass_fds=(watch,), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=ROOT, timeout=120).returncode
    os.close(watch)
    assert rc == 143
    record = json.loads((store/"results"/"notebooks"/"r0"/"sleep.json").read_text())
    assert record["status"] == "Stopped" and "stopped by SIGTERM" in record["failure"]
    log = (store/"results"/"notebooks"/"r0"/"sleep.log").read_text()
    assert "the nlpmt command that started this job is gone" in log and "training started" not in log
    assert not opt_ml.exists()                                     # the job removed its own folder


# ---------------------------------------------------------------- slow: a tiny transformer killed mid-training

TRAIN = dict(epochs=3, learning_rate=1e-2, batch_size=8, max_length=32, save_steps=5, precision="fp32", num_threads=1)


@pytest.fixture(scope="module")
def transformer_job(tmp_path_factory):
    "A seeded data store, a tiny BERT, and the metrics of an uninterrupted `nlpmt run transformer` of them."
    from nlpmt.transformer import make_tiny_bert, separable_texts
    from test_transformer import seed_store
    model = make_tiny_bert(tmp_path_factory.mktemp("models")/"tiny-bert", separable_texts(300)["text"])
    data = tmp_path_factory.mktemp("data"); seed_store(LocalStore(data), n=300)
    args = ["-p", "model_name", str(model)] + [a for k, v in TRAIN.items() for a in ("-p", k, str(v))]
    ref = tmp_path_factory.mktemp("reference"); shutil.copytree(data, ref/"store")
    cli = Cli(ref, [NLPMT, "run", "transformer", "--store", str(ref/"store"), *args])
    try: assert cli.proc.wait(600) == 0, cli.text()[-4000:]
    finally: cli.close()
    return data, args, json.loads((ref/"store"/"results"/"transformer"/"tiny-bert_metrics.json").read_text())


def latest_checkpoint(store: Path) -> int:
    "The step of the newest complete checkpoint in the store (0 if none)."
    from nlpmt.transformer import CHECKPOINT_MARKER
    steps = [int(p.parent.name.split("-")[1]) for p in (store/"models"/"checkpoints").glob(f"*/checkpoint-*/{CHECKPOINT_MARKER}")]
    return max(steps, default=0)

def wait_for_checkpoint(store: Path, cli: Cli, min_step: int, timeout: float = 300) -> int:
    "Wait until the store holds a complete checkpoint of at least `min_step` optimizer steps."
    deadline = time.time() + timeout
    while time.time() < deadline:
        if latest_checkpoint(store) >= min_step: return latest_checkpoint(store)
        if cli.proc.poll() is not None: break
        time.sleep(0.02)
    kill_job(cli.tag); pytest.fail(f"no checkpoint of step >= {min_step}:\n{cli.text()[-4000:]}")


@pytest.mark.slow
def test_nlpmt_run_killed_mid_training_by_sigterm_then_sigkill_stops_each_time_and_resumes_to_the_same_result(transformer_job, tmp_path):
    "Two interrupted runs (SIGTERM to the command, then SIGKILL), then a third that resumes: the uninterrupted result."
    data, args, reference = transformer_job
    store = tmp_path/"store"; shutil.copytree(data, store)
    step = 0
    for how in ("SIGTERM", "SIGKILL"):
        cli = Cli(tmp_path, [NLPMT, "run", "transformer", "--store", str(store), *args])
        try:
            step = wait_for_checkpoint(store, cli, min_step=step + 10)
            if how == "SIGTERM":
                cli.proc.send_signal(signal.SIGTERM); assert cli.proc.wait(120) == 143, cli.text()[-4000:]
            else:
                cli.proc.kill(); cli.proc.wait(10)
            assert_stopped_cleanly(cli, store, "transformer", how)
            step = latest_checkpoint(store)   # the stage may run a few steps past the signal: the next round waits beyond them
            assert not (store/"results"/"transformer"/"tiny-bert_metrics.json").exists(), f"the run finished before {how}"
            log = (only_run(store)/"transformer.log").read_text()
            assert "SIGTERM received" in log                       # the stage's checkpoint handler ran
            if how == "SIGKILL": assert "the nlpmt command that started this job is gone" in log
        finally: cli.close()
        shutil.rmtree(store/"results"/"notebooks")
    again = Cli(tmp_path, [NLPMT, "run", "transformer", "--store", str(store), *args])
    try: assert again.proc.wait(600) == 0, again.text()[-4000:]
    finally: again.close()
    resumed = json.loads((store/"results"/"transformer"/"tiny-bert_metrics.json").read_text())
    assert step <= resumed["resumed_from_step"] < reference["steps"]
    for key in ("validation", "test", "predictions", "steps", "best_step"):
        assert resumed[key] == reference[key], key
