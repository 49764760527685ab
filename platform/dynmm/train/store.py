"""A run's checkpoints, on a local folder or any pyarrow filesystem (``s3://``, ``gs://``, ``file://``).

Every way a run trains (in the driver or a Tune trial, or on a Ray Train worker group) keeps its checkpoints
here, so resuming reads one place: ``<run>/checkpoints/<name>/`` folders and a pointer file, ``latest.json``,
naming the newest and the ones kept. A folder is written whole before the pointer moves to it (one small
object written last: object stores have no folder rename), so a reader never opens half a checkpoint; folders
the pointer no longer keeps are deleted after it moved. Checkpoints are handed out as ``ray.train.Checkpoint``
objects that carry their filesystem, so a checkpoint on object storage is opened where it lies.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow.fs
import ray.train

CHECKPOINTS_FOLDER = "checkpoints"
POINTER_FILE = "latest.json"


def filesystem_of(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem of a local path or a URI, and the path on it."""
    if "://" not in location:
        location = Path(os.path.abspath(location)).as_uri()
    return pyarrow.fs.FileSystem.from_uri(location)


def is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def join(location: str, *names: str) -> str:
    return "/".join([location.rstrip("/"), *names])


def checkpoint_uri(checkpoint: ray.train.Checkpoint) -> str:
    """Where ``checkpoint`` lies, as a string that ``open_checkpoint`` turns back into it: a local path, or a URI
    with the filesystem's scheme (a checkpoint's ``path`` alone has lost it)."""
    filesystem = checkpoint.filesystem
    if filesystem is None or isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    scheme = {"gcs": "gs"}.get(filesystem.type_name, filesystem.type_name)
    return f"{scheme}://{checkpoint.path.lstrip('/')}"


def open_checkpoint(location: str) -> ray.train.Checkpoint:
    """The checkpoint at a local path or a URI (``checkpoint_uri``), on its own filesystem."""
    filesystem, path = filesystem_of(location)
    return ray.train.Checkpoint(path, filesystem=filesystem)


class CheckpointStore:
    """The checkpoints of the run at ``run_location`` (storage path / run name), keeping the newest
    ``num_to_keep``."""

    def __init__(self, run_location: str, num_to_keep: int = 2) -> None:
        self.location = join(run_location, CHECKPOINTS_FOLDER)
        self.filesystem, self.root = filesystem_of(self.location)
        self.num_to_keep = num_to_keep

    def latest(self) -> ray.train.Checkpoint | None:
        """The newest checkpoint, or None for a run that wrote none yet."""
        kept = self._read_pointer()
        return self._checkpoint(kept[-1]) if kept else None

    def save(self, directory: str | Path, name: str) -> ray.train.Checkpoint:
        """Upload ``directory`` as the checkpoint ``name`` (unique per call), make it the newest, and delete the
        ones beyond ``num_to_keep``."""
        folder = f"{name}-{uuid.uuid4().hex[:8]}"
        self.filesystem.create_dir(f"{self.root}/{folder}", recursive=True)
        pyarrow.fs.copy_files(str(Path(directory).resolve()), f"{self.root}/{folder}",
                              source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=self.filesystem)
        kept = [*self._read_pointer(), folder]
        dropped, kept = kept[: -self.num_to_keep], kept[-self.num_to_keep:]
        self._write_pointer(kept)
        for old in dropped:
            self.filesystem.delete_dir(f"{self.root}/{old}")
        return self._checkpoint(folder)

    def _checkpoint(self, folder: str) -> ray.train.Checkpoint:
        return ray.train.Checkpoint(f"{self.root}/{folder}", filesystem=self.filesystem)

    def _read_pointer(self) -> list[str]:
        path = f"{self.root}/{POINTER_FILE}"
        if self.filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
            return []
        with self.filesystem.open_input_stream(path) as stream:
            return list(json.loads(stream.read())["kept"])

    def _write_pointer(self, kept: list[str]) -> None:
        put_whole(self.filesystem, f"{self.root}/{POINTER_FILE}", json.dumps({"kept": kept}).encode())


def put_whole(filesystem: pyarrow.fs.FileSystem, path: str, data: bytes) -> None:
    """A small file that readers see whole or not at all: written under a temporary name and moved where the
    filesystem can rename a file atomically (local, HDFS); on object storage a single put is atomic already."""
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        directory, _, name = path.rpartition("/")
        temporary = f"{directory}/.{name}.{uuid.uuid4().hex}"
        with filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        filesystem.move(temporary, path)
        return
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)


def delete_if_present(filesystem: pyarrow.fs.FileSystem, path: str) -> None:
    """Delete the folder at ``path`` with everything under it; one already gone is no error."""
    try:
        filesystem.delete_dir(path)
    except FileNotFoundError:
        pass
