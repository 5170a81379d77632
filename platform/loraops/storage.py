"""The one place a storage URI becomes a ``pyarrow.fs`` filesystem: experiments (``search.storage``)
and the registry (``LORAOPS_ARTIFACT_URI``) both open theirs here, and read, write and copy files
through the functions below.

``s3://BUCKET/PREFIX`` is configured the way the AWS CLI and SDKs are, from the environment:

- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or any other source of the SDK's default
  chain: a profile, an instance role). They are never passed to the filesystem object, so they are
  not in anything it is pickled into (Tune's experiment state, a trial's arguments): every process
  reads its own environment.
- ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``: an S3-compatible server (MinIO, SeaweedFS,
  Ceph). Its scheme picks http or https. When one is set, no public AWS endpoint is ever tried.
- ``AWS_REGION``, else ``AWS_DEFAULT_REGION`` (a custom endpoint without one gets ``us-east-1``,
  which S3-compatible servers accept).

Other URIs (``gs://``, ``file://``) go to ``pyarrow.fs.FileSystem.from_uri``; a plain path is a
local folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from loraops.errors import LoraopsError

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
KEY_VARS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
#: Seconds to wait for a connection / a reply: an unreachable endpoint fails in seconds, not minutes.
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 60.0


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def endpoint() -> tuple[str | None, str | None]:
    """The custom S3 endpoint from the environment and the variable that set it, else (None, None)."""
    for name in ENDPOINT_VARS:
        if value := os.environ.get(name, "").strip():
            return value, name
    return None, None


def region() -> str | None:
    for name in REGION_VARS:
        if value := os.environ.get(name, "").strip():
            return value
    return None


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``uri`` and the path inside it (bucket/prefix for S3, absolute for local)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    scheme, _, rest = uri.partition("://")
    if scheme != "s3":
        try:
            return pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise LoraopsError(f"cannot open {uri}: {_first_line(exc)}") from None
    path = rest.strip("/")
    if not path:
        raise LoraopsError(f"{uri!r} names no bucket or folder: use s3://BUCKET/PREFIX")
    return s3_filesystem(), path


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem set up from the environment (see the module's docstring)."""
    url, variable = endpoint()
    options: dict = {"connect_timeout": CONNECT_TIMEOUT, "request_timeout": REQUEST_TIMEOUT}
    options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
    if url:
        parts = urlsplit(url if "://" in url else f"https://{url}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise LoraopsError(f"{variable}={url!r}: expected http://HOST:PORT or https://HOST")
        options |= {"endpoint_override": parts.netloc, "scheme": parts.scheme, "region": region() or "us-east-1"}
    elif region():
        options["region"] = region()
    return pafs.S3FileSystem(**options)


def check_access(filesystem: pafs.FileSystem, path: str, uri: str) -> None:
    """Fail with one line naming ``uri`` and the variable to check when its bucket cannot be used:
    a wrong key, a missing bucket, an unreachable endpoint. Nothing is written."""
    if not isinstance(filesystem, pafs.S3FileSystem):
        return
    bucket = path.split("/", 1)[0]
    try:
        info = filesystem.get_file_info(bucket)
        filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))  # a listing: the key must grant reading
    except OSError as exc:
        raise LoraopsError(describe_error(uri, exc)) from None
    if info.type == pafs.FileType.NotFound:
        raise LoraopsError(f"{uri}: bucket {bucket!r} does not exist{_at_endpoint()}: create it, or fix the URI")


def describe_error(uri: str, exc: BaseException) -> str:
    """One line for a failed S3 call: what went wrong with ``uri`` and which variable to check.
    Built from the error's kind only: the SDK's text is not repeated (it may quote request headers)."""
    text = str(exc)
    lowered = text.lower()
    if any(word in lowered for word in ("access_denied", "access denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden")):
        return f"{uri}: access denied{_at_endpoint()}: check {KEY_VARS}"
    if any(word in lowered for word in ("couldn't connect", "could not connect", "connection refused", "timeout", "timed out", "resolve host", "network")):
        url, variable = endpoint()
        target = f"{url} ({variable})" if url else "the AWS endpoint (set AWS_ENDPOINT_URL for an S3-compatible server)"
        return f"{uri}: cannot connect to {target}"
    if "nosuchbucket" in lowered or "bucket" in lowered and "not found" in lowered:
        return f"{uri}: the bucket does not exist{_at_endpoint()}: create it, or fix the URI"
    return f"{uri}: storage error{_at_endpoint()}: {_first_line(exc)}"


def _at_endpoint() -> str:
    url, variable = endpoint()
    return f" at {url} ({variable})" if url else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def usage(filesystem: pafs.FileSystem, path: str) -> tuple[int, int, int]:
    """(objects, bytes, checkpoint folders) under ``path``."""
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = [info for info in infos if info.type == pafs.FileType.File]
    checkpoints = set()
    for info in files:
        parts = info.path.split("/")
        inside = [i for i, part in enumerate(parts[:-1]) if part.startswith("checkpoint_")]
        if inside:
            checkpoints.add("/".join(parts[: inside[0] + 1]))
    return len(files), sum(info.size for info in files), len(checkpoints)


# --- reading, writing and copying files ------------------------------------------------------------

#: Bytes per read when files are streamed (a checkpoint is never held in memory whole).
CHUNK = 4 * 1024 * 1024


def exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def read_text(filesystem: pafs.FileSystem, path: str) -> str:
    """The UTF-8 text of the file ``path`` (FileNotFoundError when there is none)."""
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(filesystem: pafs.FileSystem, path: str, text: str) -> None:
    """Write ``text`` to the file ``path``, creating its folder."""
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())


def upload_file(local: Path, filesystem: pafs.FileSystem, path: str) -> None:
    """Copy the local file ``local`` to ``path`` of ``filesystem``."""
    pafs.copy_files(str(local), path, destination_filesystem=filesystem)


def download_tree(filesystem: pafs.FileSystem, path: str, target: Path) -> int:
    """Copy every file under the folder ``path`` of ``filesystem`` into the local folder ``target``,
    streamed in :data:`CHUNK` pieces; returns how many files (0: none, nothing written)."""
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = [info for info in infos if info.type == pafs.FileType.File]
    for info in files:
        local = target / info.path[len(path) :].lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        with filesystem.open_input_stream(info.path) as reader, open(local, "wb") as writer:
            while chunk := reader.read(CHUNK):
                writer.write(chunk)
    return len(files)
