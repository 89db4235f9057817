import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BOTTLE = Path(os.environ.get("STFPM_BOTTLE", REPO.parent / "shared" / "data" / "mvtec" / "bottle"))


@pytest.fixture(scope="session")
def synthetic_mvtec(tmp_path_factory):
    from stfpm_edge.synthetic import make_mvtec_like

    return make_mvtec_like(tmp_path_factory.mktemp("synth") / "weave", n_train=16, n_test_good=4, n_test_defect=6, height=96, width=128, seed=1)


@pytest.fixture(scope="session")
def tiny_run(synthetic_mvtec, tmp_path_factory):
    """A student trained for two epochs at 64x64 on the synthetic set (shared by several tests)."""
    from stfpm_edge.config import load_config
    from stfpm_edge.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config(None, dict(data=str(synthetic_mvtec), out=str(out), epochs=2, batch_size=8, height=64, width=64, lr=0.05, overlays=3,
                                 reference="student"))
    run_dir, metrics = train(cfg, progress=False)
    return run_dir, metrics


@pytest.fixture(scope="session")
def exported(tiny_run, tmp_path_factory):
    """The tiny run's checkpoint and its FP32 ONNX export (batch 1)."""
    from stfpm_edge.export.onnx_export import export_onnx

    run_dir, _ = tiny_run
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(run_dir / "model.pt", out)
    return run_dir / "model.pt", out


def write_image(path, img, ext=".png"):
    """Encode ``img`` with OpenCV and write it (parents created); returns the path."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(ext, img)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def run_without_modules(code: str, forbidden: tuple[str, ...]) -> None:
    """Run ``code`` in a fresh interpreter and assert it never imported any of ``forbidden``."""
    import subprocess
    import sys

    check = f"\nimport sys\nbad = [m for m in {forbidden!r} if m in sys.modules]\nprint('imported:', bad)\nsys.exit(1 if bad else 0)\n"
    res = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def bottle_or_skip() -> Path:
    if not (BOTTLE / "train" / "good").is_dir():
        pytest.skip(f"real MVTec bottle data not found at {BOTTLE} (set STFPM_BOTTLE or place ../shared beside the repo)")
    return BOTTLE


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---- nothing a test writes may land in the repository (a 5.5 MB ONNX blob once did)
def _stray_files() -> set[str] | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "--others", "-z"], capture_output=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout: nothing to compare
    noise = ("__pycache__/", ".pytest_cache/", ".venv/", ".egg-info/", ".ruff_cache/")
    return {p for p in out.decode().split("\0") if p and not any(n in p for n in noise)}


def pytest_sessionstart(session):
    session.config._stray_before = _stray_files()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_stray_before", None)
    after = _stray_files()
    if before is None or after is None:
        return
    new = sorted(after - before)
    if new:
        import sys

        print(f"\nERROR: the tests wrote {len(new)} file(s) into the repository: {', '.join(new[:10])}", file=sys.stderr)
        session.exitstatus = 1
