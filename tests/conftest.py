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
    """A model trained for two epochs at 64x64 on the synthetic set (shared by several tests)."""
    from stfpm_edge.config import load_config
    from stfpm_edge.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config(None, dict(data=str(synthetic_mvtec), out=str(out), epochs=2, batch_size=8, height=64, width=64, lr=0.05, overlays=3))
    run_dir, metrics = train(cfg, progress=False)
    return run_dir, metrics


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
