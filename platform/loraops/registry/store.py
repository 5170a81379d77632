"""Artifact storage for registered versions, through ``pyarrow.fs``.

The root is a local folder by default, or any URI that ``pyarrow.fs.FileSystem.from_uri``
understands (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///...``). Layout::

    ROOT/NAME/vN/...                            the files of version N (immutable once registered)
    ROOT/NAME/.staging-<UTC time>-<random>/...  an upload in progress; moved to vN when complete

Files are hashed (sha256) while they are copied, so the checksums stored in the database are of
the bytes that were read from the source, and every later read can be verified against them.

A store that fails half-way (an S3 server going down) fails the operation with one line
(:func:`loraops.storage.describe_error`) and leaves no version behind; what it could not clean up
then (a staging folder, files at vN whose row never committed) is removed later: vN by the next
publish of that number, stale staging folders by the next registration of the name
(:meth:`ArtifactStore.sweep_staging`).
"""

from __future__ import annotations

import calendar
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypedDict

import pyarrow.fs as pafs

from loraops.errors import LoraopsError
from loraops.storage import CHUNK

log = logging.getLogger(__name__)



class FileEntry(TypedDict):
    """One stored file of a version: its checksum and size. Kept as this plain JSON object in the
    version's database row (``files``), so reading it back needs no conversion."""

    sha256: str  # hex digest
    size: int  # bytes


#: A version's files: {relative posix path: FileEntry}.
Manifest = dict[str, FileEntry]
#: A staging folder older than this (by the time in its name) is debris of a registration that failed
#: and could not clean up; younger ones may be uploads in progress and are never touched.
STALE_STAGING_S = 3600.0
_STAGING_TIME = "%Y%m%dT%H%M%SZ"
_STAGING = re.compile(r"\.staging-(\d{8}T\d{6}Z)-[0-9a-f]+")


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


def _check_digest(label: str, rel: str, where: str, expected: FileEntry, actual: str) -> None:
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
        staging = self.path(name, f".staging-{time.strftime(_STAGING_TIME, time.gmtime())}-{uuid.uuid4().hex}")
        manifest: Manifest = {}
        try:
            self.fs.create_dir(staging, recursive=True)
            for rel in local_files(source, skip):
                manifest[rel] = self._upload(source / rel, f"{staging}/{rel}")
        except OSError as exc:  # a remote store failing half-way: one line, and no debris left if it can be removed
            self.delete(staging)
            raise self._failure(self.uri, exc) from None
        except BaseException:
            self.delete(staging)
            raise
        return StagedUpload(staging, manifest)

    def _upload(self, source: Path, target: str) -> FileEntry:
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
        return FileEntry(sha256=digest.hexdigest(), size=size)

    def publish(self, staged: StagedUpload, name: str, version: int) -> str:
        """Move a complete staging folder to ``NAME/vN`` and return that path.

        The number was just allocated under the database lock, so anything already at vN is
        debris of a registration whose transaction rolled back and can be removed.
        """
        final = self.version_path(name, version)
        try:
            self.delete(final)
            self.move(staged.path, final, staged.manifest)
        except OSError as exc:  # e.g. the store went down half-way: files left at vN go with the next publish of N
            raise self._failure(self.uri, exc) from None
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
        """Remove a folder (or file) if it exists; failures only log (at debug level: they follow the
        store's failure that the caller reports, and what stays is removed later), cleanup is best effort."""
        try:
            info = self.fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(path)
        except OSError as exc:
            log.debug("could not remove %s: %s", path, exc)

    def sweep_staging(self, name: str, now: float | None = None) -> list[str]:
        """Remove ``NAME``'s staging folders older than :data:`STALE_STAGING_S` (by the UTC time in their
        names): debris of registrations whose store failed before they could clean up. Younger ones may be
        uploads in progress and stay, as do names without a time. Best effort; returns the paths removed."""
        cutoff = (time.time() if now is None else now) - STALE_STAGING_S
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(name), allow_not_found=True))
        except OSError as exc:
            log.debug("could not list the staging folders of %s: %s", name, exc)
            return []
        started = {info.path: _STAGING.fullmatch(info.base_name) for info in infos}
        stale = [path for path, found in started.items() if found and calendar.timegm(time.strptime(found[1], _STAGING_TIME)) < cutoff]
        for path in stale:
            self.delete(path)
        if stale:
            log.info("removed %d staging folder(s) of %s left over an hour ago by registrations that failed", len(stale), name)
        return stale

    @staticmethod
    def _failure(uri: str, exc: OSError) -> LoraopsError:
        """One line for a store call that failed: what went wrong with ``uri`` and which variable to check."""
        from loraops import storage

        return LoraopsError(storage.describe_error(uri, exc))

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
            except OSError as exc:  # the store is unreachable or refuses: nothing is known about the file itself
                raise LoraopsError(f"{label}: file {rel} cannot be read: {self._failure(self.uri, exc)}") from None
            _check_digest(label, rel, where, expected, digest.hexdigest())

    def download(self, path: str, manifest: Manifest, target: Path) -> Path:
        """Copy a stored version to a local folder: written beside it, renamed when complete.

        A store that cannot be read (unreachable, refusing) is a :class:`LoraopsError` naming the
        version's URI and the variable to check, so a replica reports it rather than only logging it."""
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
                except OSError as exc:
                    raise self._failure(self.uri_of(path), exc) from None
                with reader, open(local, "wb") as writer:
                    while chunk := self._read(reader, path):
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

    def _read(self, reader, path: str) -> bytes:
        """The next chunk of a download; the store failing mid-file is one line (a local disk's errors are not wrapped)."""
        try:
            return reader.read(CHUNK)
        except OSError as exc:
            raise self._failure(self.uri_of(path), exc) from None

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
