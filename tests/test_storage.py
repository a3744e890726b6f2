"""The store on a local folder and on S3 (a real moto server), including a connection-reset fault test."""
import hashlib, os, random, socket, struct, threading
from pathlib import Path
import boto3, pandas as pd, pytest
from nlpmt.storage import (LocalStore, S3Store, StoreError, UnsafeKeyError, open_store, sync, sync_up, sync_down,
                           file_etag, LAYOUT, TOP_LEVEL)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    "The same test cases run on a local folder store and on an S3 store served by moto."
    if request.param == "local": return LocalStore(tmp_path/"store")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/project/prefix")


def make_tree(root: Path, n: int = 6, size: int = 2048, seed: int = 0) -> dict[str, bytes]:
    "Files in the layout folders under `root`; returns key -> content."
    rng, files = random.Random(seed), {}
    for i in range(n):
        key = f"{LAYOUT[i % len(LAYOUT)]}/file_{i}.bin"
        data = bytes(rng.getrandbits(8) for _ in range(size + i))
        (root/key).parent.mkdir(parents=True, exist_ok=True); (root/key).write_bytes(data); files[key] = data
    return files


def test_round_trip_formats(store):
    store.write_bytes("data/raw/blob.bin", b"\x00\x01binary")
    assert store.read_bytes("data/raw/blob.bin") == b"\x00\x01binary"
    store.write_text("configs/note.txt", "héllo\n")
    assert store.read_text("configs/note.txt") == "héllo\n"
    store.write_json("results/baseline/m_metrics.json", {"acc": 0.9, "labels": ["a", "b"]})
    assert store.read_json("results/baseline/m_metrics.json") == {"acc": 0.9, "labels": ["a", "b"]}
    df = pd.DataFrame({"text": ['quote " and, comma', "new\nline"], "label": ["x", "y"]})
    store.write_csv("data/processed/train_2class.csv", df)
    pd.testing.assert_frame_equal(store.read_csv("data/processed/train_2class.csv"), df)
    assert store.exists("data/raw/blob.bin") and not store.exists("data/raw/blob")
    with pytest.raises(StoreError, match="no such object"): store.read_bytes("data/raw/missing.bin")


def test_listing(store):
    for key in ["results/baseline/a.json", "results/transformer/b.json", "results/baseline_extra/c.json"]:
        store.write_text(key, "{}")
    assert store.list("results/baseline") == ["results/baseline/a.json"]
    assert store.list("results") == ["results/baseline/a.json", "results/baseline_extra/c.json",
                                     "results/transformer/b.json"]
    info = store.list_info("results/transformer")
    assert info["results/transformer/b.json"].size == 2
    assert info["results/transformer/b.json"].etag == hashlib.md5(b"{}").hexdigest()


def test_sync_up_down_identical_and_idempotent(store, tmp_path):
    src = tmp_path/"src"; files = make_tree(src)
    up = sync_up(store, src, progress=False)
    assert sorted(up.copied) == sorted(files) and up.skipped == []
    again = sync_up(store, src, progress=False)
    assert again.copied == [] and sorted(again.skipped) == sorted(files)
    down = sync_down(store, tmp_path/"dst", progress=False)
    assert sorted(down.copied) == sorted(files)
    for key, data in files.items(): assert (tmp_path/"dst"/key).read_bytes() == data
    assert sync_down(store, tmp_path/"dst", progress=False).copied == []
    # a changed file (same size, different bytes) is detected by checksum, not size
    key = sorted(files)[0]; changed = bytes(reversed(files[key]))
    (src/key).write_bytes(changed)
    r = sync_up(store, src, progress=False)
    assert r.copied == [key] and store.read_bytes(key) == changed


def test_dry_run_and_delete(store, tmp_path):
    src = tmp_path/"src"; files = make_tree(src, n=3)
    dry = sync_up(store, src, dry_run=True, progress=False)
    assert sorted(dry.copied) == sorted(files) and store.list() == [] and "[dry run]" in dry.summary()
    sync_up(store, src, progress=False)
    store.write_text("results/baseline/only_in_store.json", "{}")
    kept = sync_up(store, src, progress=False)  # never deletes unless asked
    assert kept.deleted == [] and store.exists("results/baseline/only_in_store.json")
    gone = sync_up(store, src, delete=True, progress=False)
    assert gone.deleted == ["results/baseline/only_in_store.json"]
    assert not store.exists("results/baseline/only_in_store.json")


def test_large_file_goes_multipart(store, tmp_path):
    big = tmp_path/"src"/"models/final/big/model.bin"; big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(17 * 1024 * 1024))
    r = sync_up(store, tmp_path/"src", progress=False)
    assert r.copied == ["models/final/big/model.bin"]
    etag = store.list_info("models/final/big")["models/final/big/model.bin"].etag
    assert etag == file_etag(big)
    if isinstance(store, S3Store): assert etag.endswith("-3")  # 17 MB in 8 MB parts
    assert sync_up(store, tmp_path/"src", progress=False).copied == []
    out = tmp_path/"down"; sync_down(store, out, progress=False)
    assert file_etag(out/"models/final/big/model.bin") == file_etag(big)


def test_unsafe_keys_refused(store, tmp_path):
    for bad in ["../escape.txt", "data/../../escape.txt", "/abs.txt", "a\\b.txt"]:
        with pytest.raises(UnsafeKeyError): store.write_text(bad, "x")
    target = tmp_path/"target"
    if isinstance(store, S3Store):
        # a hostile object key inside the bucket must not be written outside the download folder
        store.client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/results/../../../escape.txt", Body=b"x")
        with pytest.raises(UnsafeKeyError): sync_down(store, target, progress=False)
    else:
        with pytest.raises(UnsafeKeyError): store.download_file("../../escape.txt", target/"x")
    assert not (tmp_path/"escape.txt").exists() and not (target.parent.parent/"escape.txt").exists()


def test_local_writes_are_atomic(tmp_path):
    st = LocalStore(tmp_path)
    st.write_text("results/a.json", "old")
    class Boom(Exception): pass
    class BadFrame(pd.DataFrame):
        def to_csv(self, *a, **k): raise Boom()
    with pytest.raises(Boom): st.write_csv("results/a.json", BadFrame({"x": [1]}))
    assert st.read_text("results/a.json") == "old"
    assert [p.name for p in (tmp_path/"results").iterdir()] == ["a.json"]  # no temp files left behind


# ---------------------------------------------------------------------------------------------------------------
# Fault test: a TCP proxy between boto3 and moto that resets a share of connections mid-stream.

class ResettingProxy:
    "Forwards 127.0.0.1:port to `upstream`; resets (RST) a seeded share of connections after a random byte count."
    def __init__(self, upstream_port: int, reset_share: float, seed: int = 0):
        self.upstream_port, self.reset_share, self.rng = upstream_port, reset_share, random.Random(seed)
        self.sock = socket.socket(); self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0)); self.sock.listen(64); self.port = self.sock.getsockname()[1]
        self.resets, self.connections, self.closed = 0, 0, False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try: client, _ = self.sock.accept()
            except OSError: return
            self.connections += 1
            budget = self.rng.randrange(0, 300_000) if self.rng.random() < self.reset_share else None
            threading.Thread(target=self._serve, args=(client, budget), daemon=True).start()

    @staticmethod
    def _rst(*socks):
        for s in socks:
            try: s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); s.close()
            except OSError: pass

    def _serve(self, client, budget):
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        sent = [0]
        def pump(a, b, count):
            try:
                while True:
                    data = a.recv(65536)
                    if not data: break
                    if count and budget is not None:
                        sent[0] += len(data)
                        if sent[0] > budget:
                            self.resets += 1; self._rst(client, upstream); return
                    b.sendall(data)
            except OSError: pass
            finally:
                for s in (a, b):
                    try: s.shutdown(socket.SHUT_RDWR)
                    except OSError: pass
        threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()
        pump(client, upstream, True)

    def close(self):
        self.closed = True; self.sock.close()


def _s3_store_via(endpoint: str, bucket: str, max_attempts: int) -> S3Store:
    from botocore.config import Config
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          config=Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                                        s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=30))
    return S3Store(f"s3://{bucket}/faulty", client=client)


def _assert_reported_objects_identical(report, files, direct: S3Store):
    "Every object a report lists as copied is in the bucket, whole and current."
    for key in report.copied: assert direct.read_bytes(key) == files[key], f"{key} reported synced but differs"


@pytest.mark.parametrize("reset_share,max_attempts", [(0.3, 10), (1.0, 2)])
def test_sync_survives_or_fails_loudly_under_connection_resets(aws_env, s3_bucket, tmp_path, reset_share, max_attempts):
    port = int(aws_env.rsplit(":", 1)[1])
    src = tmp_path/"src"; files = make_tree(src, n=20, size=150_000, seed=1)
    big = "models/final/m/weights.bin"; (src/big).parent.mkdir(parents=True, exist_ok=True)
    files[big] = os.urandom(17 * 1024 * 1024); (src/big).write_bytes(files[big])
    direct = S3Store(f"s3://{s3_bucket}/faulty")
    stale = sorted(files)[0]; direct.write_bytes(stale, b"stale old version")  # must be replaced, never kept
    proxy = ResettingProxy(port, reset_share, seed=7)
    try:
        faulty = _s3_store_via(f"http://127.0.0.1:{proxy.port}", s3_bucket, max_attempts)
        try:
            report = sync_up(faulty, src, progress=False)
            failed = False
        except StoreError as e:
            failed, report = True, e.report
            assert "rerun to resume" in str(e) and len(report.copied) < len(files)
        _assert_reported_objects_identical(report, files, direct)
        if not failed: assert sorted(report.copied) == sorted(files)
        assert proxy.resets > 0
    finally:
        proxy.close()
    rerun = sync_up(direct, src, progress=False)  # a rerun completes and skips what was already verified
    assert set(rerun.copied) | set(rerun.skipped) == set(files)
    for key, data in files.items(): assert direct.read_bytes(key) == data
    assert sync_up(direct, src, progress=False).copied == []


def test_sync_up_skips_a_symlink_out_of_the_store_syncs_the_rest_and_fails_naming_it(store, tmp_path, capsys):
    "Issue 11: a file symlinked out of the local folder used to stop `sync up` for good on that key."
    from nlpmt.cli import main
    src = tmp_path/"src"; files = make_tree(src, n=10)
    secret = tmp_path/"outside"/"secret.txt"; secret.parent.mkdir(); secret.write_text("never upload me")
    leak = "results/baseline/aaa_leak.txt"                          # sorts first: the rest must still sync
    os.symlink(secret, src/leak)
    inside = "results/alias.bin"; os.symlink(src/sorted(files)[0], src/inside)   # a link inside the folder is fine
    with pytest.raises(StoreError, match="aaa_leak.txt") as err:
        sync_up(store, src, progress=False)
    assert err.value.report.refused == [leak] and f"{secret}" in capsys.readouterr().err   # warned, naming the target
    assert sorted(store.list()) == sorted([*files, inside]) and not store.exists(leak)
    assert store.read_bytes(inside) == files[sorted(files)[0]]
    # the CLI: every other file reported as synced (unchanged now), the link named, exit code 1; the same on a rerun
    for _ in range(2):
        rc = main(["sync", "up", store.uri if isinstance(store, LocalStore) else f"s3://{store.bucket}/{store.prefix}",
                   "--local", str(src), "--prefix", "results", "--prefix", "data", "--prefix", "models", "-q"])
        out, errtext = capsys.readouterr()
        assert rc == 1 and f"REFUSED {leak}" in out and "unchanged" in out
        assert "aaa_leak.txt" in errtext and "outside" in errtext
    assert not store.exists(leak)


def test_keys_of_230_characters_sync_down_and_write_in_place(store, tmp_path):
    "The temporary file name used to be the final name plus 38 characters: past the 255-byte limit for long keys."
    long_key = "results/baseline/" + "m" * 208 + "_metrics.json"
    assert len(long_key) >= 230 and len(long_key.rsplit("/", 1)[1]) > 255 - 38
    store.write_text(long_key, "{}")                                # the local store writes via a temporary file too
    report = sync_down(store, tmp_path/"down", progress=False)
    assert report.copied == [long_key] and (tmp_path/"down"/long_key).read_text() == "{}"
    assert [p.name for p in (tmp_path/"down"/"results"/"baseline").iterdir()] == [long_key.rsplit("/", 1)[1]]
