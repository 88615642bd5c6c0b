"""Where shards live: a local directory or an S3-compatible prefix, behind one set of calls.

Every reader and writer of shards (``sharding.build``, ``sharding.verify``, ``pipeline.source``,
the torch backend, the benchmarks) goes through here, so a path may be ``data/shards`` or
``s3://bucket/prefix`` anywhere one is accepted. Local writes go through ``sharding.atomic``;
an S3 object appears whole or not at all (a PUT, or a multipart upload that is completed only
after its last part), so both kinds keep the rule that a file under its final name is complete.

S3 credentials, region and endpoint come from the standard AWS chain (environment variables,
``~/.aws/config`` and ``~/.aws/credentials``, instance roles); ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) points it at an S3-compatible store such as MinIO or Ceph. Nothing is
hard-coded. Every request has a connect and read timeout and a bounded number of attempts, so
a wrong endpoint or a missing bucket fails within seconds with one line naming the URL
(``StorageError``) instead of hanging. ``boto3`` is imported only when an s3:// URL is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from sharding.atomic import atomic_write

SCHEME = "s3://"
# Bounded waits: a request to an endpoint that does not answer fails after about
# MAX_ATTEMPTS * (CONNECT_TIMEOUT_S + backoff), never hangs.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 2
# Objects at least this large go up as a multipart upload in parts of MULTIPART_PART_BYTES:
# a failed part is retried alone, and no single request carries a whole 100 MB shard.
# S3 needs every part but the last to be at least 5 MiB.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_PART_BYTES = 16 * 1024 * 1024


class StorageError(OSError):
    """Storage cannot be read or written; the message names the URL and the reason."""


class NotFound(StorageError, FileNotFoundError):
    """The file or object does not exist (its bucket does)."""


def is_url(path: str | os.PathLike) -> bool:
    """True for an ``s3://bucket/key`` URL, False for a local path."""
    return os.fspath(path).startswith(SCHEME)


def join(root: str | os.PathLike, name: str) -> str:
    """``root/name`` for a directory or an S3 prefix."""
    root = os.fspath(root)
    if is_url(root):
        return f"{root.rstrip('/')}/{name}"
    return os.path.join(root, name)


def split_url(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; raises ``StorageError`` for a URL without one."""
    bucket, _, key = url[len(SCHEME) :].partition("/")
    if not bucket:
        raise StorageError(f"{url}: no bucket in the URL; use s3://BUCKET/PREFIX")
    return bucket, key


# --- S3 client and errors ---------------------------------------------------------------------

_clients: dict[tuple, object] = {}


def _client():
    # One client per process (a forked DataLoader worker must not share its parent's
    # connection pool) and per endpoint and profile, so a changed environment is honoured.
    env = tuple(
        os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")
    )
    key = (os.getpid(), env)
    if key not in _clients:
        import boto3  # defer: only s3:// URLs need it
        from botocore.config import Config

        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        )
        _clients[key] = boto3.session.Session().client("s3", config=config)
    return _clients[key]


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


@contextmanager
def _errors(url: str, missing: str = "no such object") -> Iterator[None]:
    """Turn botocore's exceptions into one-line ``StorageError``s naming ``url``."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code == "NoSuchBucket":
            raise StorageError(f"{url}: no such bucket {split_url(url)[0]!r}") from None
        if code in ("NoSuchKey", "404", "NotFound"):
            if not _bucket_exists(url):  # a HEAD answers 404 for a missing bucket as well
                raise StorageError(f"{url}: no such bucket {split_url(url)[0]!r}") from None
            raise NotFound(f"{url}: {missing}") from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(
                f"{url}: access denied ({code}); check the AWS credentials and their rights"
            ) from None
        reason = error.get("Message") or code or exc
        raise StorageError(f"{url}: {reason}") from None
    except (NoCredentialsError, PartialCredentialsError):
        raise StorageError(
            f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE with ~/.aws/credentials"
        ) from None
    except ConnectionError as exc:  # endpoint refused, unresolvable, or timed out
        raise StorageError(f"{url}: cannot reach the S3 endpoint {_endpoint()} ({exc})") from None
    except BotoCoreError as exc:
        raise StorageError(f"{url}: {exc}") from None


def _bucket_exists(url: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        _client().head_bucket(Bucket=split_url(url)[0])
    except ClientError as exc:
        return exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket")
    return True


# --- reading ----------------------------------------------------------------------------------


def exists(path: str | os.PathLike) -> bool:
    """True when the file or object exists; an unreadable bucket raises ``StorageError``."""
    try:
        size(path)
    except NotFound:
        return False
    return True


def size(path: str | os.PathLike) -> int:
    """The file's or object's size in bytes; ``NotFound`` when it does not exist."""
    path = os.fspath(path)
    if not is_url(path):
        try:
            return os.path.getsize(path)
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None
    bucket, key = split_url(path)
    with _errors(path):
        return _client().head_object(Bucket=bucket, Key=key)["ContentLength"]


def read_bytes(path: str | os.PathLike, start: int = 0, length: int | None = None) -> bytes:
    """The whole file or object, or ``length`` bytes from ``start`` (one ranged request)."""
    path = os.fspath(path)
    if not is_url(path):
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None
    bucket, key = split_url(path)
    extra = {}
    if start or length is not None:
        end = "" if length is None else start + length - 1
        extra["Range"] = f"bytes={start}-{end}"
    with _errors(path):
        return _client().get_object(Bucket=bucket, Key=key, **extra)["Body"].read()


def download(url: str, local: str | os.PathLike, progress=None) -> None:
    """Fetch a whole object into ``local`` atomically: large objects in parallel ranged parts
    (``MULTIPART_PART_BYTES`` each), small ones in one GET. ``progress(n)`` is told of every
    ``n`` bytes received."""
    from boto3.s3.transfer import TransferConfig

    from sharding.atomic import atomic_path

    bucket, key = split_url(url)
    config = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_PART_BYTES,
        max_concurrency=4,
        use_threads=True,
    )
    with _errors(url), atomic_path(local, fsync=False) as tmp:
        _client().download_file(bucket, key, str(tmp), Config=config, Callback=progress)


def read_text(path: str | os.PathLike) -> str:
    """The file or object decoded as UTF-8."""
    return read_bytes(path).decode("utf-8")


def list_names(root: str | os.PathLike) -> list[str]:
    """Names directly inside a directory or under an S3 prefix (sub-prefixes end in '/').

    A local directory that does not exist, or an S3 prefix with nothing under it, lists empty.
    """
    root = os.fspath(root)
    if not is_url(root):
        if not os.path.isdir(root):
            return []
        return sorted(p.name + ("/" if p.is_dir() else "") for p in Path(root).iterdir())
    bucket, prefix = split_url(root)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    names = []
    with _errors(root):
        pages = _client().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names += [obj["Key"][len(prefix) :] for obj in page.get("Contents", [])]
            names += [p["Prefix"][len(prefix) :] for p in page.get("CommonPrefixes", [])]
    return sorted(names)


# --- writing ----------------------------------------------------------------------------------


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file (atomically) or object (one PUT)."""
    path = os.fspath(path)
    if not is_url(path):
        with atomic_write(path) as f:
            f.write(data)
        return
    bucket, key = split_url(path)
    with _errors(path):
        _client().put_object(Bucket=bucket, Key=key, Body=data)


def upload(local: str | os.PathLike, url: str) -> None:
    """Upload a local file to ``url``: one PUT, or a multipart upload from MULTIPART_THRESHOLD.

    The object appears only once complete. A failed multipart upload is aborted, so its parts
    do not linger; one cut short by a kill is invisible and is removed by the bucket's
    lifecycle rule for incomplete uploads (README).
    """
    bucket, key = split_url(url)
    client = _client()
    total = os.path.getsize(local)
    with open(local, "rb") as f, _errors(url):
        if total < MULTIPART_THRESHOLD:
            client.put_object(Bucket=bucket, Key=key, Body=f)
            return
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        try:
            parts = []
            while chunk := f.read(MULTIPART_PART_BYTES):
                number = len(parts) + 1
                answer = client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            _abort(client, bucket, key, upload_id)
            raise


def _abort(client, bucket: str, key: str, upload_id: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    # The error that got us here is the one to report, not a failed clean-up.
    with suppress(BotoCoreError, ClientError):
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)


def delete(paths: list[str]) -> None:
    """Remove files or objects that exist; missing ones are no error."""
    local = [p for p in paths if not is_url(p)]
    for path in local:
        Path(path).unlink(missing_ok=True)
    by_bucket: dict[str, list[str]] = {}
    for url in (p for p in paths if is_url(p)):
        bucket, key = split_url(url)
        by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = keys[i : i + 1000]
            url = f"{SCHEME}{bucket}/{batch[0]}"
            with _errors(url):
                answer = _client().delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StorageError(
                    f"{SCHEME}{bucket}/{first['Key']}: cannot delete ({first.get('Message')})"
                )
