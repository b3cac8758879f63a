"""One archive of a host's state and putting it on another machine: an online copy of the SQLite
store (sqlite3's backup API, while the coordinator serves) with the host's CA, keys, certificates,
host.json and bootstrap secrets, and a manifest of checksums. A PostgreSQL store is left to
pg_dump (docs/backup.md)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import sqlite3
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from muster import __version__
from muster.config import Settings, load_host, save_host
from muster.errors import AlreadyInstalledError, InvalidInputError, StoreError
from muster.hoststate import HostPaths, refuse_if_installed

FORMAT = 1
MANIFEST = "manifest.json"
CHUNK = 1 << 20
DATABASE = "coordinator/muster.db"
# The folders of a storage path that hold the host's identity and secrets (hoststate.py).
FOLDERS = ("bootstrap-state", "coordinator", "agent")
# Readable by anyone on the host, as `muster install` writes them; every other file is 0600.
PUBLIC = frozenset(
    {"coordinator/server.crt", "coordinator/ca.crt", "agent/cert.pem", "agent/ca.crt"}
)


def _invalid(message: str) -> InvalidInputError:
    """An archive that is not a Muster backup, or does not match its manifest."""
    return InvalidInputError(message, code="backup.invalid_archive", fields=["from"])


@dataclass(frozen=True)
class Backup:
    archive: Path
    members: list[str]
    store: str  # "sqlite", "postgresql", or "none" (a host without a coordinator)
    pg_dump: str | None = None  # for a PostgreSQL store: the command that dumps it


@dataclass(frozen=True)
class Restored:
    storage: Path
    manifest: dict[str, Any]
    config: Settings


def store_kind(config: Settings) -> str:
    if not config.serves_api:
        return "none"
    return "postgresql" if _database_url(config).startswith("postgres") else "sqlite"


def _database_url(config: Settings) -> str:
    return "" if config.database_url is None else config.database_url.get_secret_value()


def create_backup(storage: Path, target: Path, now: datetime) -> Backup:
    """Write `target` (tar.gz, 0600): the host's files and, for a SQLite store, a consistent copy
    of it taken while the coordinator may be writing. Raises InvalidInputError if `storage`
    holds no installation or `target` exists, StoreError if the copy of the
    store fails its integrity check, OSError for unreadable files."""
    paths = HostPaths(storage)
    config = load_host(paths)
    if config is None:
        raise InvalidInputError(
            f"{storage} holds no Muster installation", fields=["host_storage_path"]
        )
    if target.exists():
        raise InvalidInputError(f"--to: {target} exists; choose a new file name", fields=["to"])
    kind = store_kind(config)
    files: dict[str, bytes | Path] = {**_read_files(paths)}
    with tempfile.TemporaryDirectory(prefix="muster-backup-") as scratch:
        if kind == "sqlite":
            snapshot = Path(scratch) / "muster.db"
            copy_sqlite(_sqlite_file(paths, config), snapshot)
            files[DATABASE] = snapshot  # streamed: a store may be larger than memory allows
        manifest = {
            "format": FORMAT,
            "muster_version": __version__,
            "created_at": now.isoformat(),
            "runner_id": config.runner_id,
            "store": kind,
            "members": {name: _digest(source) for name, source in sorted(files.items())},
        }
        _write_archive(target, manifest, files, now)
    dump = pg_dump_command(_database_url(config)) if kind == "postgresql" else None
    return Backup(target, sorted(files), kind, dump)


def _sqlite_file(paths: HostPaths, config: Settings) -> Path:
    """The store's file: the storage path's own, unless host.json names another sqlite URL."""
    if config.database_url is not None:
        from sqlalchemy.engine.url import make_url

        return Path(make_url(_database_url(config)).database or paths.database)
    return paths.database


def pg_dump_command(database_url: str) -> str:
    """The pg_dump command line for the store at `database_url`, without its password (pg_dump
    reads that from PGPASSWORD or ~/.pgpass)."""
    from sqlalchemy.engine.url import make_url

    url = make_url(database_url)
    args = ["pg_dump", "--format=custom", "--file=muster.dump"]
    if url.host:
        args.append(f"--host={url.host}")
    if url.port:
        args.append(f"--port={url.port}")
    if url.username:
        args.append(f"--username={url.username}")
    args.append(url.database or "")
    return shlex.join(args)


def copy_sqlite(source: Path, target: Path) -> None:
    """Copy the store at `source` into the new file `target` (0600) with SQLite's online backup:
    in one step, inside one read transaction, so the copy is one consistent moment of the store
    while writers go on (WAL readers block no one). Raises StoreError if the copy is damaged."""
    fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    # Read-only: the backup must never create the store's WAL files as another user.
    src = sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.execute("PRAGMA busy_timeout=30000")
        src.backup(dst)  # pages=-1: every page in one step
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        (verdict,) = dst.execute("PRAGMA quick_check").fetchone()
    except sqlite3.Error as exc:
        raise StoreError(
            f"cannot copy the store {source}: {exc}", code="backup.store_copy"
        ) from exc
    finally:
        dst.close()
        src.close()
    _keep_owner(source)
    if verdict != "ok":
        raise StoreError(f"the copy of {source} is damaged: {verdict}", code="backup.store_copy")


def _keep_owner(database: Path) -> None:
    """A read-only connection to a store nobody has open creates its WAL side files and cannot
    remove them; made by root (backup as root, service as `muster`), they would keep the
    service from opening its own store. They go to the store's owner, and so does the writers'
    lock file (muster.storage.sqlite.WriterLock), if one made as root was left behind."""
    owner = database.stat()
    for suffix in ("-wal", "-shm", "-lock"):
        side = database.with_name(database.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            status = side.stat()
            if (status.st_uid, status.st_gid) != (owner.st_uid, owner.st_gid):
                os.chown(side, owner.st_uid, owner.st_gid)


def _read_files(paths: HostPaths) -> dict[str, bytes]:
    """host.json and every file under the identity folders, by archive name, each read once so
    the checksum is of exactly what is archived. The store's own files are left out (the
    snapshot stands in for them), and so are half-written temporary files."""
    skipped = {DATABASE, *(f"{DATABASE}-{side}" for side in ("wal", "shm", "journal", "lock"))}
    files = {"host.json": paths.host_file.read_bytes()}
    for folder in FOLDERS:
        for path in sorted((paths.root / folder).rglob("*")):
            name = path.relative_to(paths.root).as_posix()
            hidden = path.name.startswith(".")  # write_private's temporary files
            if path.is_file() and not path.is_symlink() and name not in skipped and not hidden:
                files[name] = path.read_bytes()
    return files


def _digest(source: bytes | Path) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    if isinstance(source, bytes):
        digest.update(source)
        size = len(source)
    else:
        with source.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


def _write_archive(
    target: Path, manifest: dict[str, Any], files: dict[str, bytes | Path], now: datetime
) -> None:
    """The manifest first, then each member; created 0600 under a temporary name and renamed,
    so a failed backup leaves no partial archive that looks whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                entries = {MANIFEST: json.dumps(manifest, indent=2).encode() + b"\n", **files}
                for name, source in entries.items():
                    info = tarfile.TarInfo(name)
                    info.mode = 0o644 if name in PUBLIC else 0o600
                    info.mtime = int(now.timestamp())
                    if isinstance(source, bytes):
                        info.size = len(source)
                        tar.addfile(info, io.BytesIO(source))
                    else:
                        info.size = source.stat().st_size
                        with source.open("rb") as handle:
                            tar.addfile(info, handle)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def restore_backup(archive: Path, storage: Path, *, database_url: str | None = None) -> Restored:
    """Put the host in `archive` at `storage`, which must not hold an installation. Every member
    is checked against the manifest before any of it is moved into `storage`; keys, secrets and
    the store are written 0600, folders 0700. With `database_url` the restored host.json points
    at that store (a PostgreSQL database restored under another name). Raises
    AlreadyInstalledError, InvalidInputError (code backup.invalid_archive), OSError."""
    paths = HostPaths(storage)
    refuse_if_installed(paths)
    created = not storage.exists()
    storage.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = Path(tempfile.mkdtemp(dir=storage, prefix=".restore-"))
    try:
        manifest = extract_archive(archive, staging)
        clashes = [name for name in manifest["members"] if (storage / name).exists()]
        if clashes:
            raise AlreadyInstalledError(
                f"{storage} already holds {clashes[0]}; restore into an empty or new folder"
            )
        config = load_host(HostPaths(staging))
        assert config is not None  # extract_archive checked host.json is there
        if database_url is not None or manifest.get("store") == "sqlite":
            # A SQLite store comes back inside the storage path, wherever it was before.
            config = config.replace(database_url=database_url)
            save_host(HostPaths(staging), config)
        # host.json moves into place last: an interrupted restore never leaves a host that
        # `muster start` would run.
        for entry in sorted(staging.iterdir(), key=lambda p: p.name == "host.json"):
            os.replace(entry, storage / entry.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                storage.rmdir()  # only if still empty
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return Restored(storage, manifest, config)


def extract_archive(archive: Path, into: Path) -> dict[str, Any]:
    """Write every member of a backup under `into` (0600, certificates 0644), streamed and
    checked against the manifest's size and SHA-256; returns the manifest. Raises
    InvalidInputError (code backup.invalid_archive) for anything else: another format, a link
    or device, a path outside the host's files, a member missing, extra or changed."""
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile():
                raise _invalid(f"{archive} is not a Muster backup (no {MANIFEST} first)")
            handle = tar.extractfile(first)
            assert handle is not None  # a regular file
            manifest = json.loads(handle.read())
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise _invalid(f"{archive}: unknown backup format; restore it with its Muster")
            expected = manifest.get("members")
            if not isinstance(expected, dict) or "host.json" not in expected:
                raise _invalid(f"{archive}: its manifest lists no host.json")
            seen: set[str] = set()
            for info in tar:
                if info is first:
                    continue
                _check_name(info.name)
                if not info.isfile():
                    raise _invalid(f"{info.name}: only regular files belong in a Muster backup")
                if info.name in seen or info.name not in expected:
                    raise _invalid(f"{archive}: {info.name} is not in its manifest")
                seen.add(info.name)
                _extract(tar, info, into, expected[info.name], archive)
    except (tarfile.TarError, EOFError, ValueError, zlib.error) as exc:
        raise _invalid(f"{archive} is not a readable Muster backup: {exc}") from exc
    missing = sorted(set(expected) - seen)
    if missing:
        raise _invalid(f"{archive} lacks what its manifest lists: {', '.join(missing)}")
    return manifest


def _extract(
    tar: tarfile.TarFile, info: tarfile.TarInfo, into: Path, want: Any, archive: Path
) -> None:
    target = into / info.name
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    source = tar.extractfile(info)
    assert source is not None  # a regular file
    digest, size = hashlib.sha256(), 0
    fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.fchmod(fd, 0o644 if info.name in PUBLIC else 0o600)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if not isinstance(want, dict) or (size, digest.hexdigest()) != (
        want.get("size"),
        want.get("sha256"),
    ):
        raise _invalid(f"{archive}: {info.name} fails its checksum; the file is damaged")


def _check_name(name: str) -> None:
    """Only host.json and files in the identity folders, never an absolute or `..` path."""
    path = PurePosixPath(name)
    if (
        path.is_absolute()
        or ".." in path.parts
        or not (name == "host.json" or (len(path.parts) > 1 and path.parts[0] in FOLDERS))
    ):
        raise _invalid(f"{name}: no such file belongs in a Muster backup")
