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
