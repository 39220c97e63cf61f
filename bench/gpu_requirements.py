"""Check that every requirement of the wheels in a folder is met by a wheel in that folder or
by a package of the GPU machine's image (``GPU_IMAGE_HAS``); used by ``bench/gpu_pack.sh``.

    python bench/gpu_requirements.py DIR      # exit 1 and the missing names if any
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The GPU machine's Python 3.12 image (as its package list reads): what need not be carried.
GPU_IMAGE_HAS = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer click cloudpickle cmake colorama contourpy coverage cycler cython einops filelock flatbuffers
fonttools frozenlist fsspec h11 h5py httpcore httpx humanize idna imageio iniconfig jinja2 joblib kiwisolver
markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict networkx ninja numpy
nvidia-ml-py onnx onnx-ir onnxruntime onnxscript packaging pandas pathspec pillow pip pluggy prometheus-client
propcache protobuf psutil pygments pyparsing pytest python-dateutil pyyaml regex requests rich safetensors scipy
setuptools six sympy tabulate torch torchvision tqdm triton typing-extensions urllib3 wrapt yarl zipp
""".split()

ENVIRONMENT = {
    **default_environment(),
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "extra": "",
}


def wheel_requirements(wheel: Path) -> tuple[str, list[Requirement]]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", name))
        text = archive.read(metadata).decode("utf-8", errors="replace")
    name = re.search(r"^Name: (.+)$", text, re.M).group(1).strip()
    requirements = [
        Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")
    ]
    return canonicalize_name(name), [r for r in requirements if r.marker is None or r.marker.evaluate(ENVIRONMENT)]


def missing(folder: Path) -> dict[str, list[str]]:
    wheels = dict(wheel_requirements(path) for path in sorted(folder.glob("*.whl")))
    have = set(wheels) | {canonicalize_name(name) for name in GPU_IMAGE_HAS}
    gaps: dict[str, list[str]] = {}
    for name, requirements in wheels.items():
        for requirement in requirements:
            if canonicalize_name(requirement.name) not in have:
                gaps.setdefault(canonicalize_name(requirement.name), []).append(name)
    return gaps


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python bench/gpu_requirements.py DIR", file=sys.stderr)
        return 2
    gaps = missing(Path(argv[0]))
    for name, needed_by in sorted(gaps.items()):
        print(f"missing: {name} (needed by {', '.join(sorted(set(needed_by)))})", file=sys.stderr)
    return 1 if gaps else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
