"""Shards on S3-compatible storage, against a real server process on 127.0.0.1 (moto's).

The server is started here, so CI needs no service. Every test runs with a loopback
``AWS_ENDPOINT_URL``, fake credentials, the instance-metadata lookup disabled and no AWS
config files, so nothing here can reach a real AWS endpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline import LoaderConfig, LoaderError, build_loader
from pipeline.loader import dali_available
from sharding import storage
from sharding.build import BuildError, ShardConfig, build
from sharding.shard_format import MANIFEST
from tests.conftest import TINY_PER_SHARD, one_line_error, run_cli

BUCKET = "maskdepth-test"
BACKENDS = ["dali", "torch"] if dali_available() else ["torch"]
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
}
# Anything that could point boto3 or DALI's AWS SDK elsewhere than the local server.
UNSET = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_log(tmp_path_factory) -> Path:
    """The server's request log: one line per request, as the server saw it."""
    return tmp_path_factory.mktemp("moto") / "server.log"


def tar_gets(log: Path, start: int) -> Counter:
    """GET requests per .tar object in the server's log after byte ``start`` of it.

    The server logs a request after answering it: wait until the log has stopped growing.
    """
    size, deadline = -1, time.monotonic() + 10
    while size != log.stat().st_size and time.monotonic() < deadline:
        size = log.stat().st_size
        time.sleep(0.3)
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", errors="replace")
    return Counter(re.findall(r"GET (/[^ ?]+\.tar)[ ?]", text))


@pytest.fixture(scope="session")
def s3_server(s3_log) -> str:
    """moto's S3 server on a free loopback port, for the session; stopped by its pid."""
    port = free_port()
    log = s3_log
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **FAKE_AWS},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"moto server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
    yield url
    os.kill(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture(scope="module")
def s3_env(s3_server, tmp_path_factory):
    """The environment of a user of the local server; subprocesses inherit it."""
    nowhere = tmp_path_factory.mktemp("no-aws-config") / "absent"
    with pytest.MonkeyPatch.context() as mp:
        for key in UNSET:
            mp.delenv(key, raising=False)
        for key, value in FAKE_AWS.items():
            mp.setenv(key, value)
        mp.setenv("AWS_CONFIG_FILE", str(nowhere))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
        mp.setenv("AWS_ENDPOINT_URL", s3_server)
        assert s3_server.startswith("http://127.0.0.1:")
        storage._client().create_bucket(Bucket=BUCKET)
        yield s3_server


def tiny_cfg(tiny_zips: Path, out: str, **overrides) -> ShardConfig:
    """What ``conftest.make_shards`` builds ``tiny_shards`` with."""
    zips = tuple(str(p) for p in sorted(tiny_zips.glob("batch*_images.zip")))
    return ShardConfig(zips=zips, out=out, samples_per_shard=TINY_PER_SHARD, **overrides)


@pytest.fixture(scope="module")
def s3_shards(s3_env, tiny_zips) -> str:
    """``tiny_shards``, built straight to s3://."""
    url = f"s3://{BUCKET}/tiny"
    build(tiny_cfg(tiny_zips, url), progress=False)
    return url


# --- build and verify -----------------------------------------------------------------------


def test_build_to_s3_is_byte_identical_to_a_local_build(s3_shards, tiny_shards):
    local = sorted(p.name for p in tiny_shards.iterdir())
    assert storage.list_names(s3_shards) == local
    for name in local:
        remote = storage.read_bytes(storage.join(s3_shards, name))
        assert remote == (tiny_shards / name).read_bytes(), name


def test_verify_cli_checks_an_s3_prefix(s3_shards):
    result = run_cli("-m", "sharding.verify", s3_shards)
    assert result.returncode == 0, result.stderr
    assert f"ok: {s3_shards}: test 32 samples, train 32 samples" in result.stdout


def test_existing_manifest_is_refused_without_overwrite(s3_shards, tiny_zips):
    before = storage.read_bytes(storage.join(s3_shards, MANIFEST))
    zips = [str(p) for p in sorted(tiny_zips.glob("*.zip"))]
    result = run_cli("-m", "sharding.build", *zips, "--out", s3_shards)
    one_line_error(result, s3_shards, "--overwrite", alone=False)
    assert storage.read_bytes(storage.join(s3_shards, MANIFEST)) == before


def test_failed_upload_leaves_no_manifest_and_a_rerun_succeeds(s3_env, tiny_zips, monkeypatch):
    url = f"s3://{BUCKET}/failed-upload"
    real_upload, uploads = storage.upload, []

    def failing_upload(local, target):
        if len(uploads) == 3:
            raise storage.StorageError(f"{target}: connection reset (injected)")
        uploads.append(target)
        real_upload(local, target)

    monkeypatch.setattr(storage, "upload", failing_upload)
    with pytest.raises(BuildError, match="injected"):
        build(tiny_cfg(tiny_zips, url), progress=False)
    names = storage.list_names(url)
    assert MANIFEST not in names and len(names) == 3  # what got up before the failure
    monkeypatch.setattr(storage, "upload", real_upload)
    build(tiny_cfg(tiny_zips, url), progress=False)  # no --overwrite: leftovers are ours
    assert MANIFEST in storage.list_names(url)


# A build that SIGKILLs itself after its second upload: no clean-up code gets to run.
KILLED_BUILD = """
import os, signal, sys
from sharding import build, storage
real, done = storage.upload, []
def upload(local, target):
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    done.append(target)
    real(local, target)
storage.upload = upload
sys.exit(build.main(sys.argv[1:]))
"""


def test_killed_build_leaves_no_manifest_and_a_rerun_succeeds(
    s3_env, tiny_zips, tmp_path, monkeypatch
):
    url = f"s3://{BUCKET}/killed"
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the build stages its shards
    zips = [str(p) for p in sorted(tiny_zips.glob("*.zip"))]
    args = [*zips, "--out", url, "--samples-per-shard", str(TINY_PER_SHARD), "--workers", "1"]
    killed = run_cli("-c", KILLED_BUILD, *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    names = storage.list_names(url)
    assert names and MANIFEST not in names
    # A SIGKILL leaves the local staging directory behind, holding only the unsent shard.
    (staging,) = tmp_path.glob("maskdepth-build-*")
    assert len(list(staging.iterdir())) <= 2
    rerun = run_cli("-m", "sharding.build", *args)
    assert rerun.returncode == 0, rerun.stderr
    assert run_cli("-m", "sharding.verify", url).returncode == 0


def test_large_objects_go_up_in_parts(s3_env, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 2**20)
    monkeypatch.setattr(storage, "MULTIPART_PART_BYTES", 5 * 2**20)
    local = tmp_path / "big.tar"
    payload = os.urandom(11 * 2**20)
    local.write_bytes(payload)
    url = f"s3://{BUCKET}/multipart/big.tar"
    storage.upload(local, url)
    head = storage._client().head_object(Bucket=BUCKET, Key="multipart/big.tar")
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part upload
    assert storage.read_bytes(url) == payload

    client = storage._client()  # a part that fails aborts the upload: no object, no parts
    real_part = client.upload_part
    monkeypatch.setattr(client, "upload_part", lambda **kw: real_part(**{**kw, "Bucket": "nope"}))
    with pytest.raises(storage.StorageError, match="no such bucket"):
        storage.upload(local, f"s3://{BUCKET}/multipart/failed.tar")
    assert not storage.exists(f"s3://{BUCKET}/multipart/failed.tar")
    assert not client.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


# --- reading --------------------------------------------------------------------------------


def batches(loader, epoch: int = 0) -> list[dict]:
    return [dict(batch) for batch in loader.epoch(epoch)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_read_s3_as_they_read_local_shards(backend, s3_shards, tiny_shards, tmp_path):
    """One train epoch (shuffled, augmented) and the test split: identical keys and pixels."""
    cfg = LoaderConfig(
        backend=backend, batch_size=4, num_threads=1, seed=3, rank=0, world_size=1,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    for split, source in (
        ("train", s3_shards),
        ("test", f"{s3_shards}/test-{{000000..000003}}.tar"),
    ):
        remote = batches(build_loader(source, split, cfg))
        local_source = str(tiny_shards) + source[len(s3_shards) :]
        local = batches(build_loader(local_source, split, cfg))
        assert [b["key"] for b in remote] == [b["key"] for b in local]
        assert sum(len(b["key"]) for b in remote) == 32
        for r, loc in zip(remote, local):
            for part in ("bg", "fg_bg", "mask", "depth"):
                assert torch.equal(r[part], loc[part]), (split, part)


READ_TWO_EPOCHS = """
import sys
from pipeline import LoaderConfig, build_loader
rank, cache = int(sys.argv[2]), sys.argv[3]
cfg = LoaderConfig(backend=sys.argv[4], batch_size=4, num_threads=2, rank=rank, world_size=2,
                   cache_dir=cache)
loader = build_loader(sys.argv[1], "train", cfg)
print(sum(len(b["key"]) for epoch in (0, 1) for b in loader.epoch(epoch)))
"""


def read_on_two_ranks(url: str, cache: Path, backend: str = BACKENDS[0]) -> list:
    """Two processes of one node, started together, each reading two epochs of its rank."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", READ_TWO_EPOCHS, url, str(r), str(cache), backend],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(2)
    ]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    return results


def test_node_cache_fetches_each_tar_once_and_heals(s3_shards, s3_log, tmp_path):
    cache = tmp_path / "cache"
    tars = {f"train-{i:06d}.tar" for i in range(4)}
    start = s3_log.stat().st_size
    results = read_on_two_ranks(s3_shards, cache)
    assert [out.strip() for out, _ in results] == ["32", "32"]  # 16 samples x 2 epochs each
    fetched = tar_gets(s3_log, start)
    assert {Path(k).name for k in fetched} == tars and set(fetched.values()) == {1}, fetched
    # a second run on the same cache sends no request for a tar
    start = s3_log.stat().st_size
    read_on_two_ranks(s3_shards, cache)
    assert not tar_gets(s3_log, start)
    # a byte flipped in a cached tar: that tar alone is fetched again, once, and reading works
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    victim = folder / "train-000002.tar"
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0xFF
    victim.write_bytes(bytes(data))
    start = s3_log.stat().st_size
    results = read_on_two_ranks(s3_shards, cache)
    fetched = tar_gets(s3_log, start)
    assert [Path(k).name for k in fetched] == ["train-000002.tar"] and len(fetched) == 1
    assert sum(fetched.values()) == 1, fetched
    notes = [line for _, err in results for line in err.splitlines() if "fetching it again" in line]
    assert notes == [f"cache: {victim} changed since it was verified; fetching it again"]
    assert (folder / "SOURCE").read_text().strip() == s3_shards


def test_torch_workers_read_the_cache_not_s3(s3_shards, s3_log, tmp_path):
    cfg = LoaderConfig(
        backend="torch", batch_size=4, num_threads=2, world_size=1, rank=0,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    start = s3_log.stat().st_size
    loader = build_loader(s3_shards, "train", cfg)
    assert sum(len(b["key"]) for b in batches(loader)) == 32
    fetched = tar_gets(s3_log, start)
    assert len(fetched) == 4 and set(fetched.values()) == {1}, fetched  # 2 workers, one GET


def test_a_full_disk_while_caching_is_one_line_and_leaves_no_partial_file(
    s3_shards, tmp_path, monkeypatch
):
    import errno

    from sharding.atomic import atomic_path

    def fill_disk(url, local, progress=None):
        with atomic_path(local) as tmp:  # as storage.download writes: a temporary, then rename
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage, "download", fill_disk)
    cache = tmp_path / "cache"
    cfg = LoaderConfig(backend="torch", cache_dir=str(cache))
    with pytest.raises(LoaderError) as raised:
        build_loader(s3_shards, "train", cfg)
    message = str(raised.value)
    assert "\n" not in message and "the disk is full while caching" in message
    assert "free space or point --cache-dir elsewhere" in message
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert not [p.name for p in folder.iterdir() if p.suffix in (".tar", ".idx")]
    assert not list(folder.glob(".tmp-*"))  # no partial download left behind


def test_cache_limit_and_cache_dir_errors_are_one_line(s3_shards, tmp_path):
    cfg = LoaderConfig(backend="torch", cache_dir=str(tmp_path / "cache"), cache_limit=1000)
    manifest = json.loads(storage.read_text(storage.join(s3_shards, MANIFEST)))
    needed = sum(s["bytes"] for s in manifest["splits"]["train"]["shards"])
    with pytest.raises(
        LoaderError, match=f"needs {needed:,} bytes of cache but --cache-limit is 1,000"
    ):
        build_loader(s3_shards, "train", cfg)
    assert not list((tmp_path / "cache").glob("*/*.tar"))  # nothing fetched
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    with pytest.raises(LoaderError, match="cannot create the shard cache"):
        build_loader(s3_shards, "train", LoaderConfig(backend="torch", cache_dir=str(blocker)))
    assert blocker.read_text() == "keep"


def test_train_py_from_s3_matches_local(s3_shards, tiny_shards, tmp_path):
    """Train from s3:// --data; its weights evaluate alike on the local copy and on s3:// URLs."""
    import train

    args = ["--batch-size", "4", "--max-batches", "2", "--widths", "4,8,16", "--seed", "0"]
    args += ["--loader", "torch", "--num-threads", "1"]
    final = train.main(["--data", s3_shards, "--epochs", "1", "--out", str(tmp_path / "s3"), *args])
    weights = ["--test-only", "--weights", str(tmp_path / "s3" / "checkpoints" / "last.pt")]
    local = train.main(["--data", str(tiny_shards), *weights, "--out", str(tmp_path / "l"), *args])
    urls = [f"{s3_shards}/{split}-{{000000..000003}}.tar" for split in ("train", "test")]
    by_url = ["--train", urls[0], "--test", urls[1], *weights, "--out", str(tmp_path / "u")]
    evaluated = train.main([*by_url, *args])
    assert final.keys() == local.keys() == evaluated.keys()
    for key, value in final.items():
        assert local[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        assert evaluated[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_preview_reads_s3(s3_shards, tmp_path):
    from pipeline import preview

    out = tmp_path / "grid.png"
    assert (
        preview.main(["--data", s3_shards, "--out", str(out), "--n", "4", "--loader", "torch"]) == 0
    )
    assert out.stat().st_size > 0


def test_loader_benchmark_reads_s3(s3_shards, tmp_path):
    result = run_cli(
        "-m", "benchmarks.loaders", "--data", s3_shards, "--loaders", "webdataset",
        "--batch-size", "8", "--batches", "2", "--rounds", "1", "--workers", "1",
        "--json", str(tmp_path / "report.json"), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["data"]["path"] == s3_shards and report["data"]["samples"] == 32
    remote = report["remote"]  # cold, warm, and the cached files read as a local directory
    assert [remote[k]["requests"] for k in ("cold", "warm", "local")] == [8, 0, 0]  # tar + idx
    manifest = json.loads(storage.read_text(storage.join(s3_shards, MANIFEST)))
    tar_bytes = sum(s["bytes"] for s in manifest["splits"]["train"]["shards"])
    assert remote["cold"]["bytes_fetched"] > tar_bytes and remote["warm"]["bytes_fetched"] == 0
    assert all(remote[k]["samples"] == 32 for k in remote)
    assert remote["warm"]["share_of_local"] > 0
    assert "s3 warm  cache:" in result.stdout


# --- errors: one line naming the URL, exit 1, in bounded time ---------------------------------


def test_missing_object_is_named(s3_env, s3_shards, tiny_zips, tmp_path):
    url = f"s3://{BUCKET}/missing-shard"
    build(tiny_cfg(tiny_zips, url), progress=False)
    storage.delete([f"{url}/train-000002.tar"])
    one_line_error(
        run_cli("-m", "sharding.verify", url), f"{url}/train-000002.tar: missing", alone=False
    )
    # the tars arrive while the loader reads: the first read that needs this one says so
    loader = build_loader(url, "train", LoaderConfig(backend="torch", batch_size=4))
    with pytest.raises(LoaderError, match=f"{url}/train-000002.tar: no such object"):
        batches(loader)
    result = run_cli("train.py", "--data", f"s3://{BUCKET}/nothing", "--out", str(tmp_path / "r"))
    one_line_error(result, f"s3://{BUCKET}/nothing/manifest.json: not found", prefix="train.py")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("case", "env", "needle"),
    [
        ("missing bucket", {}, "no such bucket 'no-such-bucket'"),
        ("no credentials", {"AWS_ACCESS_KEY_ID": None}, "no AWS credentials found"),
        ("unreachable endpoint", {"AWS_ENDPOINT_URL": "closed"}, "cannot reach the S3 endpoint"),
    ],
)
def test_storage_failures_are_one_line_within_seconds(
    s3_env, case, env, needle, tiny_zips, tmp_path, monkeypatch
):
    bucket = "no-such-bucket" if case == "missing bucket" else BUCKET
    url = f"s3://{bucket}/shards"
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key)
        else:  # nothing listens on a port just freed
            monkeypatch.setenv(key, f"http://127.0.0.1:{free_port()}")
    zips = [str(p) for p in sorted(tiny_zips.glob("*.zip"))]
    commands = {
        "verify": ("-m", "sharding.verify", url),
        "build": ("-m", "sharding.build", *zips, "--out", url),
        "train": ("train.py", "--data", url, "--out", str(tmp_path / "run")),
    }
    for name, command in commands.items():
        start = time.monotonic()
        result = run_cli(*command, timeout=60)
        prefix = "train.py: error" if name == "train" else "error: "
        one_line_error(result, url, needle, prefix=prefix, alone=False)
        assert time.monotonic() - start < 30, f"{case}: {name} took too long"
    assert not (tmp_path / "run").exists()


# --- training starts early: the tars arrive while the loader reads ----------------------------


def hold_back_tars(monkeypatch, except_for: str, timeout: float = 30) -> tuple:
    """Hold every tar download but ``except_for`` (a name) until the returned event is set;
    the real download from the server follows. Also returns the names whose wait timed out."""
    real, released, timed_out = storage.download, threading.Event(), []

    def held(url, local, progress=None):
        name = url.rsplit("/", 1)[-1]
        if name.endswith(".tar") and name != except_for and not released.wait(timeout):
            timed_out.append(name)
        real(url, local, progress=progress)

    monkeypatch.setattr(storage, "download", held)
    return released, timed_out


def cached_tars(cache: Path) -> list[str]:
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    return sorted(p.name for p in folder.glob("*.tar") if not p.name.startswith("."))


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_batch_comes_while_the_other_tars_are_still_missing(
    backend, s3_shards, s3_log, tmp_path, monkeypatch
):
    """The test split, in order, 8 samples per tar, batch 4: the first two batches (DALI asks
    for one ahead) need test-000000.tar alone; the other tars are held back until the first
    batch is in hand, so a loader that waited for the whole split would meet the timeout."""
    released, timed_out = hold_back_tars(monkeypatch, except_for="test-000000.tar")
    cache = tmp_path / "cache"
    cfg = LoaderConfig(
        backend=backend, batch_size=4, num_threads=2, rank=0, world_size=1, cache_dir=str(cache)
    )
    start = s3_log.stat().st_size
    loader = build_loader(s3_shards, "test", cfg)
    keys, present_at_first = [], None
    for batch in loader.epoch(0):
        if present_at_first is None:
            present_at_first = cached_tars(cache)
            released.set()
        keys += batch["key"]
    assert not timed_out and present_at_first == ["test-000000.tar"], present_at_first
    assert keys == list(loader.table.keys)  # every sample, in order, once the rest arrived
    assert cached_tars(cache) == [f"test-{i:06d}.tar" for i in range(4)]
    fetched = tar_gets(s3_log, start)
    assert len(fetched) == 4 and set(fetched.values()) == {1}, fetched


# The full disk is read by DALI's feed where DALI installs, the damaged object by torch workers.
@pytest.mark.parametrize(
    ("fault", "backend"), [("damaged object", "torch"), ("full disk", BACKENDS[0])]
)
def test_a_background_fetch_error_is_one_line_and_leaves_the_cache_intact(
    fault, backend, s3_env, tiny_zips, s3_log, tmp_path, monkeypatch
):
    import errno

    from pipeline.cache_object import stamped
    from sharding.atomic import TMP_PREFIX, atomic_path

    url = f"s3://{BUCKET}/fault-{fault.replace(' ', '-')}"
    build(tiny_cfg(tiny_zips, url), progress=False)
    victim = f"{url}/train-000002.tar"
    original, real_download = storage.read_bytes(victim), storage.download
    if fault == "damaged object":  # replaced on the server after the build
        damaged = bytearray(original)
        damaged[5000] ^= 0xFF
        storage.write_bytes(victim, bytes(damaged))
        needle = f"{victim}: its sha256 does not match the manifest's"
    else:

        def fill_disk(source, local, progress=None):
            if source != victim:
                return real_download(source, local, progress=progress)
            with atomic_path(local) as tmp:  # as storage.download writes: a temporary, renamed
                tmp.write_bytes(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(storage, "download", fill_disk)
        needle = f"the disk is full while caching {victim}; free space or point --cache-dir"
    cache = tmp_path / "cache"
    cfg = LoaderConfig(
        backend=backend, batch_size=4, num_threads=2, rank=0, world_size=1, cache_dir=str(cache)
    )
    loader = build_loader(url, "train", cfg)  # the tars arrive while it reads
    with pytest.raises(LoaderError) as raised:
        batches(loader)
    message = str(raised.value)
    assert "\n" not in message and needle in message, message
    loader.source.fetch.close()  # nothing in flight any more: the cache is as the error left it
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert not [p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]
    kept = cached_tars(cache)
    assert "train-000002.tar" not in kept and all(stamped(folder / name) for name in kept)
    if fault == "damaged object":  # and as training reports it: one line, exit 1
        result = run_cli(
            "train.py", "--data", url, "--out", str(tmp_path / "run"), "--epochs", "1",
            "--batch-size", "4", "--loader", "torch", "--num-threads", "1",
            "--widths", "4,8,16", "--cache-dir", str(tmp_path / "cli-cache"),
        )  # fmt: skip
        one_line_error(result, needle, prefix="train.py: error", alone=False)
        storage.write_bytes(victim, original)
    else:
        monkeypatch.setattr(storage, "download", real_download)
    # mended: the same cache fetches only what it lacks, once each, and reads every sample
    start = s3_log.stat().st_size
    assert sum(len(b["key"]) for b in batches(build_loader(url, "train", cfg))) == 32
    fetched = tar_gets(s3_log, start)
    missing = {f"train-{i:06d}.tar" for i in range(4)} - set(kept)
    assert {Path(k).name for k in fetched} == missing and set(fetched.values()) == {1}, fetched


# Rank 1 of a node whose every tar download hangs halfway, holding the object's lock.
HANG_HALFWAY = """
import sys, time
from pipeline import LoaderConfig, build_loader
from sharding import storage
from sharding.atomic import atomic_path
real = storage.download
def download(url, local, progress=None):
    if not url.endswith(".tar"):
        return real(url, local, progress=progress)
    with atomic_path(local) as tmp:
        tmp.write_bytes(b"partial")
        print("holding", url, flush=True)
        time.sleep(600)
storage.download = download
cfg = LoaderConfig(backend="torch", batch_size=4, num_threads=0, rank=1, world_size=2,
                   cache_dir=sys.argv[2])
for batch in build_loader(sys.argv[1], "test", cfg).epoch(0):
    pass
"""


def test_a_rank_waiting_on_a_tar_takes_over_when_its_fetcher_dies(
    s3_shards, s3_log, tmp_path, monkeypatch
):
    import fcntl

    from sharding.atomic import TMP_PREFIX

    cache = tmp_path / "cache"
    start = s3_log.stat().st_size
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    other = subprocess.Popen(
        [sys.executable, "-c", HANG_HALFWAY, s3_shards, str(cache)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = other.stdout.readline()  # it holds a tar's lock, mid-download
        assert line.startswith("holding"), other.stderr.read()
        real_lockf, found_busy = fcntl.lockf, []

        def lockf(fd, operation):
            if operation == fcntl.LOCK_EX:  # see whether this rank is about to wait on the other
                try:
                    return real_lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    if not found_busy:
                        found_busy.append(True)
                        os.kill(other.pid, signal.SIGKILL)  # the fetcher dies mid-download
            return real_lockf(fd, operation)

        monkeypatch.setattr(fcntl, "lockf", lockf)
        cfg = LoaderConfig(
            backend="torch", batch_size=4, num_threads=2, rank=0, world_size=2,
            cache_dir=str(cache),
        )  # fmt: skip
        assert sum(len(b["key"]) for b in batches(build_loader(s3_shards, "test", cfg))) == 16
    finally:
        if other.poll() is None:
            os.kill(other.pid, signal.SIGKILL)
        other.communicate(timeout=30)
    assert found_busy and other.returncode == -signal.SIGKILL
    fetched = tar_gets(s3_log, start)  # the dead rank's downloads sent no GET; this one's did
    assert len(fetched) == 4 and set(fetched.values()) == {1}, fetched
    assert cached_tars(cache) == [f"test-{i:06d}.tar" for i in range(4)]
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert not [p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]
