"""What ``bentoml serve`` checks once, before any worker starts: every setting against its
bounds, and the model opened exactly as a worker will open it.

The model is opened in a child process (``python -m serving.startup``) by the worker's own
code path (:func:`serving.engine.load_engine`: store entry, labels, metadata, the graph of
the chosen precision on the chosen device) and run on one blank image; the child then exits,
so the ``bentoml serve`` process keeps no session, memory or GPU context. A corrupt store
entry or graph therefore stops the server once, with one line, instead of a worker that
restarts in a loop.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from serving.engine import EngineError, check_model, load_engine
from serving.settings import Settings, SettingsError
from vgg.errors import one_line

__all__ = ["check_start", "open_as_worker"]

logger = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 600  # opening and running a large graph once (a GPU's first call included)
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def check_start() -> str:
    """Raise :class:`SettingsError` or :class:`EngineError` (one line) when a worker could not
    serve; return the model's tag."""
    settings = Settings.from_env()
    tag = check_model(require_gpu=settings.require_gpu, precision=settings.precision)
    open_as_worker()
    return tag


def open_as_worker(timeout_s: float = OPEN_TIMEOUT_S) -> None:
    """Open and run the model in a child process as a worker would; :class:`EngineError` with
    the child's one-line reason when it cannot."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "serving.startup"],
            cwd=SOURCE_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise EngineError(f"opening the model took more than {timeout_s:.0f} s") from None
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1].removeprefix("error: ") if lines else f"exit code {result.returncode}"
        raise EngineError(reason[:300])


def main() -> int:
    """The child: open the model as worker 1 does and classify one blank image."""
    logging.basicConfig(level=logging.ERROR)
    import numpy as np

    try:
        settings = Settings.from_env()
        engine = load_engine(require_gpu=settings.require_gpu, precision=settings.precision, intra_op_threads=1)
        engine.run(np.zeros((1, engine.test_scale, engine.test_scale, 3), dtype=np.uint8))
    except (EngineError, SettingsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # an ONNX Runtime failure on the first call, of its own type
        print(f"error: the model cannot run: {one_line(error, with_type=True)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
