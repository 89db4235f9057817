"""The container recipes in deploy/docker: what they copy exists, and the Jetson image (run side only, no PyTorch) installs
every third-party module the run side imports. Neither image is built here (no Docker daemon, no NVIDIA base images)."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
# the run side's third-party imports and the distribution that provides each; None: the base image carries it
PROVIDER = {"numpy": "numpy", "cv2": "opencv-python-headless", "typer": "typer", "yaml": "pyyaml", "tqdm": "tqdm", "onnx": "onnx",
            "onnxruntime": "onnxruntime", "paho": "paho-mqtt", "pymodbus": "pymodbus", "starlette": "starlette", "uvicorn": "uvicorn",
            "prometheus_client": "prometheus-client", "pycuda": "pycuda", "tensorrt": None}
# engines a Jetson image does not serve: the PyTorch reference (.pt) and a Triton client; and the Triton server side
NOT_ON_JETSON = {"stfpm_edge/engines/torch_engine.py", "stfpm_edge/engines/triton_engine.py"}


def _third_party_imports(paths):
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    import sys

    return {n for n in names if n not in sys.stdlib_module_names and n not in ("stfpm_edge", "__future__")}


def _pip_installed(dockerfile: Path) -> set[str]:
    text = dockerfile.read_text().replace("\\\n", " ")
    out = set()
    for line in text.splitlines():
        for cmd in re.findall(r"pip3? install ([^&]+)", line):
            out.update(w.strip("'\"").split("==")[0].split(">=")[0] for w in cmd.split() if not w.startswith("-") and w != ".")
    return out


def test_what_the_dockerfiles_copy_exists():
    for dockerfile in (DOCKER / "Dockerfile", DOCKER / "Dockerfile.jetson"):
        copies = re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), flags=re.M)
        assert copies, dockerfile
        for sources in copies:
            for src in sources.split():
                assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} names nothing in the repository"
        assert re.search(r'^ENTRYPOINT \[.*"stfpm-edge"\]$', dockerfile.read_text(), flags=re.M)
        assert "USER stfpm" in dockerfile.read_text()  # not root


def test_the_jetson_image_installs_what_the_run_side_imports_and_no_torch():
    run_side = [p for p in (REPO / "stfpm_edge").rglob("*.py")
                if p.relative_to(REPO).parts[1] in ("engines", "stream") or p.name in ("geometry.py", "scoring.py", "drift.py", "fileio.py",
                                                                                       "errors.py", "onnxmeta.py", "render.py", "timing.py", "cli.py")]
    run_side = [p for p in run_side if str(p.relative_to(REPO)) not in NOT_ON_JETSON]
    imported = _third_party_imports(run_side)
    assert {"numpy", "cv2", "onnxruntime", "paho", "pymodbus"} <= imported  # the scan sees real imports
    unknown = imported - set(PROVIDER)
    assert not unknown, f"the run side imports {sorted(unknown)}: add them to Dockerfile.jetson and PROVIDER"
    installed = _pip_installed(DOCKER / "Dockerfile.jetson")
    missing = {PROVIDER[m] for m in imported if PROVIDER[m] is not None} - installed
    assert not missing, f"Dockerfile.jetson does not install {sorted(missing)}"
    assert not {"torch", "torchvision", "timm"} & installed and "--no-deps ." in (DOCKER / "Dockerfile.jetson").read_text().replace("\\\n", " ")
