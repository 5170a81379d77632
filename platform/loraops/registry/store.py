"""Artifact storage for registered versions, through ``pyarrow.fs``.

The root is a local folder by default, or any URI that ``pyarrow.fs.FileSystem.from_uri``
understands (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///...``). Layout::

    ROOT/NAME/vN/...                    the files of version N (immutable once registered)
    ROOT/NAME/.staging-<random>/...     an upload in progress; moved to vN when complete

Files are hashed (sha256) while they are copied, so the checksums stored in the database are of
the bytes that were read from the source, and every later read can be verified against them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow.fs as pafs

from loraops.errors import LoraopsError

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024
#: {relative posix path: {"sha256": hex digest, "size": bytes}}
Manifest = dict[str, dict[str, Any]]


class IntegrityError(LoraopsError):
    """A stored file is missing or does not match its recorded checksum."""


@dataclass(frozen=True)
class StagedUpload:
    """Files copied into the store under a temporary name, not yet a version."""

    path: str
    manifest: Manifest


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(folder: Path, skip: Collection[str] = ()) -> list[str]:
    """Relative posix paths of the regular files under ``folder`` except ``skip``, sorted (symlinks followed)."""
    files = sorted(rel for p in folder.rglob("*") if p.is_file() and (rel := p.relative_to(folder).as_posix()) not in skip)
    if not files:
        raise LoraopsError(f"{folder} holds no files to register")
    return files


def manifest_of(folder: str | os.PathLike) -> Manifest:
    """Checksums and sizes of every file under a local folder."""
    root = Path(folder)
    return {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size} for rel in local_files(root)}


def manifest_digest(manifest: Manifest) -> str:
    """One sha256 for a whole version: of its files' paths and checksums, in path order."""
    digest = hashlib.sha256()
    for rel, entry in sorted(manifest.items()):
        digest.update(f"{rel}\0{entry['sha256']}\n".encode())
    return digest.hexdigest()


def verify_local(folder: str | os.PathLike, manifest: Manifest, label: str) -> None:
    """Raise :class:`IntegrityError` naming the first file that is missing, resized or altered."""
    root = Path(folder)
    for rel, expected in sorted(manifest.items()):
        path = root / rel
        if not path.is_file():
            raise IntegrityError(f"{label}: file {rel} is missing from {root}")
        try:
            actual = sha256_file(path)
        except OSError as exc:  # e.g. permissions changed behind the registry's back
            raise IntegrityError(f"{label}: file {rel} cannot be read ({path}): {exc.strerror or exc}") from None
        _check_digest(label, rel, str(path), expected, actual)


def _check_digest(label: str, rel: str, where: str, expected: dict[str, Any], actual: str) -> None:
    if actual != expected["sha256"]:
        raise IntegrityError(
            f"{label}: checksum mismatch for file {rel} ({where}): expected sha256 {expected['sha256']}, "
            f"found {actual}; the stored artifact was modified or corrupted"
        )


class ArtifactStore:
    """One registry's artifact root on a local or remote filesystem."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None):
        """``uri`` is a folder path or URI; pass ``filesystem`` to use ``uri`` as a path inside it."""
        if filesystem is None:
            filesystem, root = self._open(uri)
        else:
            root = uri
        self.uri = uri
        self.fs = filesystem
        self.root = root.rstrip("/") or "/"

    @staticmethod
    def _open(uri: str) -> tuple[pafs.FileSystem, str]:
        from loraops import storage

        filesystem, root = storage.open_uri(uri)
        if not root.strip("/"):  # e.g. "file://": pyarrow accepts it, every write then fails
            raise LoraopsError(f"artifact store {uri!r} names no bucket or folder: use e.g. s3://BUCKET/PREFIX")
        return filesystem, root

    def check(self) -> None:
        """Fail with one line naming the store and the variable to check when it cannot be used
        (a wrong key, a missing bucket, an unreachable endpoint), before anything is written."""
        from loraops import storage

        storage.check_access(self.fs, self.root, self.uri)

    @property
    def is_local(self) -> bool:
        """True when the files can be read in place (no download to a cache needed)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return str(PurePosixPath(self.root, *parts))

    def uri_of(self, path: str) -> str:
        """A URI that names ``path`` for people and other tools (the root's scheme kept)."""
        scheme, separator, _ = self.uri.partition("://")
        if not separator:
            return path
        if scheme == "file":
            return f"file://{path}"
        return f"{scheme}://{path.lstrip('/')}"  # s3://bucket/..., gs://bucket/...

    def version_path(self, name: str, version: int) -> str:
        return self.path(name, f"v{version}")

    # --- writing -------------------------------------------------------------------------------

    def stage(self, name: str, source: Path, skip: Collection[str] = ()) -> StagedUpload:
        """Copy every file under ``source`` (but ``skip``) into a fresh staging folder, hashing as it goes."""
        staging = self.path(name, f".staging-{uuid.uuid4().hex}")
        manifest: Manifest = {}
        try:
            self.fs.create_dir(staging, recursive=True)
            for rel in local_files(source, skip):
                manifest[rel] = self._upload(source / rel, f"{staging}/{rel}")
        except OSError as exc:  # a remote store failing half-way: one line, and no debris left
            self.delete(staging)
            from loraops import storage

            raise LoraopsError(storage.describe_error(self.uri, exc)) from None
        except BaseException:
            self.delete(staging)
            raise
        return StagedUpload(staging, manifest)

    def _upload(self, source: Path, target: str) -> dict[str, Any]:
        digest = hashlib.sha256()
        size = 0
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        with open(source, "rb") as reader, self.fs.open_output_stream(target) as writer:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                writer.write(chunk)
                size += len(chunk)
        stored = self.fs.get_file_info(target).size
        if stored != size:  # a short write on a remote store must not become a version
            raise LoraopsError(f"copy of {source} to {target} is incomplete: {stored} of {size} bytes")
        return {"sha256": digest.hexdigest(), "size": size}

    def publish(self, staged: StagedUpload, name: str, version: int) -> str:
        """Move a complete staging folder to ``NAME/vN`` and return that path.

        The number was just allocated under the database lock, so anything already at vN is
        debris of a registration whose transaction rolled back and can be removed.
        """
        final = self.version_path(name, version)
        self.delete(final)
        self.move(staged.path, final, staged.manifest)
        return final

    def move(self, source: str, target: str, manifest: Manifest) -> None:
        """Move the folder ``source`` (holding the files in ``manifest``) to ``target``."""
        try:
            self.fs.move(source, target)  # one rename on local disks
        except (OSError, NotImplementedError):
            # Object stores have no folder rename: move file by file (a copy + delete each).
            for rel in manifest:
                self.fs.create_dir(f"{target}/{rel}".rsplit("/", 1)[0], recursive=True)
                self.fs.move(f"{source}/{rel}", f"{target}/{rel}")
            self.delete(source)

    def delete(self, path: str) -> None:
        """Remove a folder (or file) if it exists; failures only log, cleanup is best effort."""
        try:
            info = self.fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(path)
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc)

    # --- reading -------------------------------------------------------------------------------

    def verify(self, path: str, manifest: Manifest, label: str) -> None:
        """Re-hash the stored files under ``path`` in place (streamed, nothing kept) against ``manifest``.

        Raises :class:`IntegrityError` naming the first file that is missing, unreadable or altered.
        """
        if self.is_local:
            verify_local(path, manifest, label)
            return
        for rel, expected in sorted(manifest.items()):
            where = self.uri_of(f"{path}/{rel}")
            digest = hashlib.sha256()
            try:
                with self.fs.open_input_stream(f"{path}/{rel}") as reader:
                    while chunk := reader.read(CHUNK):
                        digest.update(chunk)
            except FileNotFoundError:
                raise IntegrityError(f"{label}: file {rel} is missing from {self.uri_of(path)}") from None
            except OSError as exc:
                raise IntegrityError(f"{label}: file {rel} cannot be read ({where}): {exc}") from None
            _check_digest(label, rel, where, expected, digest.hexdigest())

    def download(self, path: str, manifest: Manifest, target: Path) -> Path:
        """Copy a stored version to a local folder: written beside it, renamed when complete."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.parent / f".{target.name}.partial-{uuid.uuid4().hex}"
        try:
            for rel in manifest:
                local = partial / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                try:
                    reader = self.fs.open_input_stream(f"{path}/{rel}")
                except FileNotFoundError:
                    raise IntegrityError(f"file {rel} is missing from {self.uri_of(path)}") from None
                with reader, open(local, "wb") as writer:
                    while chunk := reader.read(CHUNK):
                        writer.write(chunk)
            try:
                os.replace(partial, target)
            except OSError:
                if not target.is_dir():
                    raise
                # another process finished the same download first; the caller verifies it
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return target

    def local_copy(self, path: str, manifest: Manifest, cache_root: Path, label: str) -> Path:
        """A local folder with the verified files of the version stored at ``path``.

        A local store is read in place; a remote one is downloaded once into
        ``cache_root/sha256-DIGEST`` (keyed by the files' checksums, so two registries sharing a
        workspace never mix up their "v1"s), reused while it verifies and fetched again when it
        does not. Raises :class:`IntegrityError` naming the first bad file.
        """
        if self.is_local:
            verify_local(path, manifest, label)
            return Path(path)
        cache = cache_root / f"sha256-{manifest_digest(manifest)}"
        if cache.is_dir():
            try:
                verify_local(cache, manifest, f"{label}, cached copy")
                return cache
            except LoraopsError as exc:
                log.warning("%s; downloading it again", exc)
                shutil.rmtree(cache, ignore_errors=True)
        self.download(path, manifest, cache)
        verify_local(cache, manifest, label)
        return cache
