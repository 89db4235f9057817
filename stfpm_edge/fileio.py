"""Atomic writes, hashing and secret masking: the small I/O rules every artifact follows."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or exception inside the block leaves ``path`` as it was (absent or the old version),
    never half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_SWEPT: set[Path] = set()  # folders whose orphans this process has already removed


def _remove_orphans(path: Path) -> None:
    """Temporary files of earlier writers whose process died (kill -9, power loss), in ``path``'s folder.

    Once per folder and process: a folder written to often (anomaly pictures) is not listed again
    on every write, and later orphans can only come from processes that died after this sweep.
    """
    folder = path.parent.resolve()
    if folder in _SWEPT:
        return
    _SWEPT.add(folder)
    for tmp in folder.glob(".*.tmp"):
        parts = tmp.name[:-len(".tmp")].split(".")
        try:
            pid = int(parts[-2])  # .<name>.<pid>.<random>.tmp
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not pid_alive(pid):
            tmp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


class ReservedJson:
    """A JSON file whose disk space is taken when a run starts, so that its last write finds room.

    ``reserve`` writes a placeholder padded with spaces to ``size`` bytes (whitespace after a JSON
    value is still valid JSON). ``write`` replaces the file atomically as usual; when the disk is
    full by then, it writes the JSON into the reserved bytes instead (no new blocks are needed to
    overwrite allocated ones) and returns True, so the caller can say so. A JSON larger than the
    reservation keeps its scalar fields there (the counts an operator looks at first).
    """

    def __init__(self, path: str | os.PathLike, size: int = 64 * 1024):
        self.path, self.size = Path(path), size
        self.reserved = False

    def reserve(self, placeholder: dict[str, Any]) -> None:
        text = json.dumps(placeholder, default=_json_default) + "\n"
        atomic_write_text(self.path, text + " " * max(0, self.size - len(text.encode("utf-8"))))
        self.reserved = True

    def write(self, obj: dict[str, Any]) -> bool:
        """Write ``obj``; True when it went into the reserved space because the disk was full."""
        try:
            atomic_write_json(self.path, obj)
            return False
        except OSError:
            if not self.reserved or not self.path.is_file():
                raise
        data = (json.dumps(obj, indent=2, default=_json_default) + "\n").encode("utf-8")
        if len(data) > self.size:
            scalars = {k: v for k, v in obj.items() if isinstance(v, (int, float, str, bool)) or v is None}
            data = (json.dumps({**scalars, "truncated": "the full summary did not fit the space reserved on a full disk"},
                               default=_json_default) + "\n").encode("utf-8")
        with open(self.path, "r+b") as fh:
            fh.write(data[: self.size] + b" " * max(0, self.size - len(data)))
            fh.flush()
            os.fsync(fh.fileno())
        return True


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, Paths: the types our metrics and configs contain
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of an artifact: ``model.onnx`` -> ``model.onnx.json``, ``x.engine`` -> ``x.engine.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# scheme://userinfo@host...: the userinfo ends at the LAST "@" of the URL token, so a password
# holding an unencoded "/" or "@" is masked whole
_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<rest>[^\s'\"]+)")
# key=value secrets in query strings and GStreamer properties (rtspsrc user-pw=..., ?password=...)
_KEYVALUE = re.compile(r"(?P<key>(?<![A-Za-z0-9_])(?:user-pw|password|passwd|pwd|pass|secret|token|api[-_]?key|access[-_]?token|auth)\s*=\s*)"
                       r"(?P<q>[\"'])?(?P<value>(?(q)[^\"']*|[^&\s;,]*))", re.IGNORECASE)


def _mask_url(m: re.Match) -> str:
    rest = m["rest"]
    at = rest.rfind("@")
    if at < 0:
        return m.group(0)
    userinfo, host = rest[:at], rest[at:]
    if ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        return f"{m['scheme']}{user}:***{host}"
    return m.group(0)


def mask_secrets(text: str) -> str:
    """Mask credentials anywhere in ``text``: ``rtsp://user:password@host/x`` -> ``rtsp://user:***@host/x``,
    ``?password=x`` / ``token=x`` -> ``password=***``, GStreamer ``user-pw=x`` -> ``user-pw=***``."""
    text = _URL.sub(_mask_url, str(text))
    return _KEYVALUE.sub(lambda m: f"{m['key']}{m['q'] or ''}***" if m["value"] else m.group(0), text)
