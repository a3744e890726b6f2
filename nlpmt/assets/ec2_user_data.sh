#!/usr/bin/env bash
# nlpmt EC2 user-data: install nlpmt, sync data/processed and configs down from the store, and start JupyterLab
# bound to 127.0.0.1 with a token (reach it through an SSH tunnel: `nlpmt aws ec2 connect INSTANCE_ID`).
#
# Parameters are environment variables. `nlpmt aws ec2 launch` writes them as `export` lines below the marker;
# the script also runs by hand (e.g. to restart JupyterLab after a reboot: `bash ec2_user_data.sh`).
#   NLPMT_STORE     the store to sync from, s3://bucket/prefix (or a local folder)              (required)
#   NLPMT_SRC       the project source: a git URL or a local folder     (default: the nlpmt GitHub repository)
#   NLPMT_REF       git branch or tag to check out                      (default: the default branch)
#   WORKDIR         holds the project, its venv, the local store and logs          (default: $HOME/nlpmt)
#   PORT            JupyterLab port on 127.0.0.1                                          (default: 8888)
#   JUPYTER_TOKEN   JupyterLab token                  (default: a random one kept in $WORKDIR/.jupyter_token)
#   NLPMT_USER      user to run as when started as root (cloud-init)    (default: ubuntu, if that user exists)
#   PYTHON          interpreter whose packages (PyTorch, CUDA) the venv inherits
#                                                     (default: /opt/pytorch/bin/python on the DLAMI, else python3)
#   NLPMT_PIP_OPTS  extra pip options, e.g. "--no-deps --no-build-isolation" for an offline install
#   NLPMT_WAIT      seconds to wait for JupyterLab to answer                                (default: 180)
# Nothing secret is passed in: the instance profile provides AWS access and the token is made on the instance.
set -euo pipefail

# --- nlpmt parameters (written by `nlpmt aws ec2 launch`) ---

# cloud-init runs user-data as root: hand over to the login user so files and JupyterLab belong to them.
if [ "$(id -u)" = 0 ] && [ -z "${NLPMT_AS_USER:-}" ]; then
  if [ -z "${NLPMT_USER:-}" ] && id -u ubuntu >/dev/null 2>&1; then NLPMT_USER=ubuntu; fi
  if [ -n "${NLPMT_USER:-}" ]; then
    copy=$(mktemp /tmp/nlpmt-user-data.XXXXXX)
    install -o "$NLPMT_USER" -m 700 "$0" "$copy"
    exec sudo -u "$NLPMT_USER" -H \
      --preserve-env=NLPMT_STORE,NLPMT_SRC,NLPMT_REF,WORKDIR,PORT,JUPYTER_TOKEN,PYTHON,NLPMT_PIP_OPTS,NLPMT_WAIT,AWS_DEFAULT_REGION,AWS_REGION \
      env NLPMT_AS_USER=1 bash "$copy"
  fi
fi

case "$0" in /tmp/nlpmt-user-data.*) rm -f "$0";; esac   # the handed-over copy (bash keeps it open)
: "${NLPMT_STORE:?set NLPMT_STORE to the store to sync from, e.g. s3://my-bucket/nlpmt}"
NLPMT_SRC="${NLPMT_SRC:-https://github.com/nlpmt/nlpmt.git}"
WORKDIR="${WORKDIR:-$HOME/nlpmt}"
PORT="${PORT:-8888}"
NLPMT_WAIT="${NLPMT_WAIT:-180}"
case "$PORT" in ''|*[!0-9]*) echo "nlpmt user-data: PORT must be a number, got '$PORT'" >&2; exit 2;; esac

mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
PROJECT="$WORKDIR/project"          # notebooks and configs: JupyterLab's root folder
VENV="$WORKDIR/.venv"
LOCAL_STORE="$WORKDIR/store"        # the local working store the notebooks read and write (NLPMT_STORE in JupyterLab)
REMOTE_STORE="$NLPMT_STORE"         # the cloud store (NLPMT_REMOTE_STORE in JupyterLab: `nlpmt sync up "$NLPMT_REMOTE_STORE"`)
LOG="$WORKDIR/user-data.log"
exec > >(tee -a "$LOG") 2>&1
echo "nlpmt user-data: $(date -u +%FT%TZ) store=$NLPMT_STORE src=$NLPMT_SRC workdir=$WORKDIR port=$PORT"

# 1. The project source. A local folder is copied without its venv, git data, store and build outputs; files
#    already in $PROJECT are kept, so a rerun never overwrites notebooks edited on the instance.
if [ -d "$NLPMT_SRC" ]; then
  mkdir -p "$PROJECT"
  tar -C "$NLPMT_SRC" --exclude=./.git --exclude=./.venv --exclude=./store --exclude=./runs --exclude=./_docs \
      --exclude=./_proc --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
      --exclude=.ipynb_checkpoints -cf - . | tar -C "$PROJECT" --skip-old-files -xf -
elif [ -d "$PROJECT/.git" ]; then
  git -C "$PROJECT" pull --ff-only || echo "nlpmt user-data: warning: could not update $PROJECT (local changes?)"
else
  git clone --depth 1 ${NLPMT_REF:+--branch "$NLPMT_REF"} "$NLPMT_SRC" "$PROJECT"
fi

# 2. A venv that sees the base environment's packages (the DLAMI's PyTorch build), with nlpmt installed into it.
#    `--system-site-packages` only reaches the *base* interpreter, so when PYTHON is itself a venv (as on the
#    DLAMI) its site-packages are added with a .pth file.
if [ -z "${PYTHON:-}" ]; then
  if [ -x /opt/pytorch/bin/python ]; then PYTHON=/opt/pytorch/bin/python; else PYTHON=$(command -v python3); fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  # With pip in the base environment the venv gets none of its own: an old bundled pip/setuptools would shadow
  # the base environment's newer ones.
  if "$PYTHON" -m pip --version >/dev/null 2>&1 && "$PYTHON" -c 'import setuptools' 2>/dev/null; then without_pip=--without-pip; else without_pip=; fi
  "$PYTHON" -m venv --system-site-packages $without_pip "$VENV"
  site_dir=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site_dir/nlpmt-base-env.pth"
fi
# shellcheck disable=SC2086  # NLPMT_PIP_OPTS is a list of options
"$VENV/bin/python" -m pip install --disable-pip-version-check --quiet ${NLPMT_PIP_OPTS:-} -e "$PROJECT"
NLPMT="$VENV/bin/nlpmt"

# 3. Configs and processed data from the store (only changed files move; nothing local is deleted).
cd "$PROJECT"
"$NLPMT" sync down "$NLPMT_STORE" --local "$PROJECT" --prefix configs --quiet
"$NLPMT" sync down "$NLPMT_STORE" --local "$LOCAL_STORE" --prefix data/processed --quiet

# 4. JupyterLab on 127.0.0.1 only, with a token (never on a public interface; use the SSH tunnel).
TOKEN_FILE="$WORKDIR/.jupyter_token"
if [ -n "${JUPYTER_TOKEN:-}" ]; then
  (umask 077; printf '%s\n' "$JUPYTER_TOKEN" > "$TOKEN_FILE")
elif [ ! -s "$TOKEN_FILE" ]; then
  (umask 077; "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(24))' > "$TOKEN_FILE")
fi
JUPYTER_TOKEN=$(cat "$TOKEN_FILE")
PID_FILE="$WORKDIR/jupyter.pid"
if [ -s "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
  echo "nlpmt user-data: JupyterLab already running (pid $(cat "$PID_FILE"))"
else
  as_root=()
  if [ "$(id -u)" = 0 ]; then echo "nlpmt user-data: warning: running JupyterLab as root"; as_root=(--allow-root); fi
  # The token travels in the environment, not on the command line (where `ps` would show it).
  JUPYTER_TOKEN="$JUPYTER_TOKEN" NLPMT_REMOTE_STORE="$REMOTE_STORE" NLPMT_STORE="$LOCAL_STORE" \
    setsid nohup "$VENV/bin/python" -m jupyterlab --no-browser --ip=127.0.0.1 --port="$PORT" --port-retries=0 \
      --ServerApp.root_dir="$PROJECT" "${as_root[@]}" >"$WORKDIR/jupyter.log" 2>&1 < /dev/null &
  echo $! > "$PID_FILE"
fi

# 5. Wait until the server answers with the token, so "done" means reachable.
JUPYTER_TOKEN="$JUPYTER_TOKEN" "$VENV/bin/python" - "$PORT" "$NLPMT_WAIT" "$(cat "$PID_FILE")" <<'PY'
import os, sys, time, urllib.request
port, wait, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
req = urllib.request.Request(f"http://127.0.0.1:{port}/api/status",
                             headers={"Authorization": "token " + os.environ["JUPYTER_TOKEN"]})
deadline = time.time() + wait
while time.time() < deadline:
    try: os.kill(pid, 0)
    except OSError: sys.exit(f"nlpmt user-data: JupyterLab (pid {pid}) exited; see jupyter.log")
    try:
        urllib.request.urlopen(req, timeout=2); sys.exit(0)
    except Exception: time.sleep(0.5)
sys.exit(f"nlpmt user-data: JupyterLab did not answer on 127.0.0.1:{port} within {wait:.0f} s; see jupyter.log")
PY
echo "nlpmt user-data: JupyterLab is up on 127.0.0.1:$PORT (root $PROJECT, store $LOCAL_STORE, token in $TOKEN_FILE)"
