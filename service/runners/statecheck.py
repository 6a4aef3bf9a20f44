"""What comes back from a run is checked before anyone trusts it.

A tfstate must be a regular file (not a link, a FIFO, a device), within
``RunRequest.max_state_bytes`` -- checked before it is read: the tar member's size for Docker,
``fstat`` on an ``O_NOFOLLOW`` descriptor locally -- and have a tfstate's shape, parsed safely:
msgspec with a fixed top-level shape (nested values are skipped, not built), bounded integers,
and a bounded nesting depth (a RecursionError is a refusal, not a crash). Other artifacts (the
plan file, its JSON, the lock file) get the same file checks with their own size caps.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Annotated

import msgspec

# Serial and version as terraform writes them; anything beyond int64 is not a tfstate.
_Int = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_Lineage = Annotated[str, msgspec.Meta(max_length=256)]


_NO_INSTANCES = msgspec.Raw(b"[]")
_NO_OUTPUTS = msgspec.Raw(b"{}")


class _Resource(msgspec.Struct, gc=False):
    """A resource entry: its identity; its instances are skipped whole (one Raw: a state of
    millions of tiny instances must not become millions of objects)."""

    type: str
    name: str
    mode: str = "managed"
    instances: msgspec.Raw = _NO_INSTANCES


class _TfState(msgspec.Struct, gc=False):
    """The top of a tfstate (format version 4, what terraform 0.12 and later write). Outputs
    and instances stay Raw: the check costs about the state's size, whatever it holds."""

    version: Annotated[int, msgspec.Meta(ge=4, le=4)]
    serial: _Int
    lineage: _Lineage
    terraform_version: str = ""
    outputs: msgspec.Raw = _NO_OUTPUTS
    resources: list[_Resource] = []
    check_results: msgspec.Raw | None = None


_DECODER = msgspec.json.Decoder(_TfState)


def state_shape_problem(content: bytes) -> str | None:
    """Why ``content`` is not a tfstate, or None if it is one."""
    if not content.strip():
        return "the state file is empty"
    try:
        state = _DECODER.decode(content)
        if bytes(memoryview(state.outputs)[:1]) != b"{":
            return "not a tfstate: Expected `object`, got another type - at `$.outputs`"
        for i, resource in enumerate(state.resources):
            if bytes(memoryview(resource.instances)[:1]) != b"[":
                return f"not a tfstate: Expected `array`, got another type - at `$.resources[{i}].instances`"
    except RecursionError:
        return "the state is nested too deeply"
    except msgspec.ValidationError as exc:
        return f"not a tfstate: {exc}"
    except msgspec.DecodeError as exc:
        return f"not JSON: {exc}"
    return None


class ArtifactProblem(Exception):
    """An artifact that failed the file checks (not there is not a problem: None)."""


def open_beneath(root: str | os.PathLike[str], path: str | os.PathLike[str], flags: int) -> int:
    """Open ``path``, which lies under the directory ``root``, following no symbolic link on
    the way from ``root``: every directory between them is opened ``O_NOFOLLOW | O_DIRECTORY``
    relative to the one before. The run owns the directories under its root and may have put a
    link anywhere on that way (``config`` -> a host directory): ``O_NOFOLLOW`` on the last
    component alone would let the worker follow it, outside the sandbox. ``root`` itself is
    trusted (the worker made it). OSError as os.open raises it (ELOOP or ENOTDIR for a link)."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    parts = relative.split(os.sep)
    if relative.startswith("..") or os.path.isabs(relative) or "" in parts or ".." in parts:
        raise ValueError(f"{path} is not under {root}")
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    current = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            if part == ".":
                continue
            following = os.open(part, dir_flags, dir_fd=current)
            os.close(current)
            current = following
        return os.open(parts[-1], flags | os.O_NOFOLLOW, dir_fd=current)
    finally:
        os.close(current)


def read_local_artifact(
    path: str | os.PathLike[str], limit: int, *, root: str | os.PathLike[str] | None = None
) -> bytes | None:
    """Read a file the run left, refusing links (``O_NOFOLLOW``; with ``root``, the run's own
    directory, on every component beneath it: :func:`open_beneath`), anything but a regular
    file (checked on the opened descriptor, so nothing can be swapped in between), hard links
    to elsewhere, and sizes over ``limit`` (checked before reading). None if there is no file;
    ArtifactProblem says why it was refused."""
    # O_NONBLOCK: a FIFO put in its place must not block the open.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = open_beneath(root, path, flags) if root is not None else os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ArtifactProblem("it, or a directory on its way, is a symbolic link") from None
        raise ArtifactProblem(f"it cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactProblem("it is not a regular file")
        if st.st_nlink != 1:
            raise ArtifactProblem("it is a hard link")
        if st.st_size > limit:
            raise ArtifactProblem(f"it is {st.st_size} bytes, over the limit of {limit}")
        chunks: list[bytes] = []
        left = limit + 1  # one byte more: a file that grew after the fstat is still refused
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise ArtifactProblem(f"it grew past the limit of {limit} bytes while read")
        return data
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


# Go's os.FileMode type bits, as Docker reports them in a path's stat (the
# X-Docker-Container-Path-Stat header of the archive endpoint).
_GO_TYPE_BITS = {
    1 << 31: "a directory",
    1 << 27: "a symbolic link",
    1 << 26: "a device",
    1 << 25: "a named pipe",
    1 << 24: "a socket",
    1 << 21: "a character device",
    1 << 19: "not a regular file",
}


def docker_stat_problem(path_stat: dict[str, object], limit: int) -> str | None:
    """Why a path Docker describes (``get_archive``'s stat) is not an acceptable artifact."""
    mode = path_stat.get("mode")
    if not isinstance(mode, int):
        return "its file mode is unknown"
    if path_stat.get("linkTarget"):
        return "it is a symbolic link"
    for bit, what in _GO_TYPE_BITS.items():
        if mode & bit:
            return f"it is {what}"
    size = path_stat.get("size")
    if not isinstance(size, int) or size < 0:
        return "its size is unknown"
    if size > limit:
        return f"it is {size} bytes, over the limit of {limit}"
    return None
