"""Shared fixtures. Tests never reach the network: hub lookups are switched off
before anything imports huggingface_hub, and any socket to a non-loopback
address fails the test."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    raise RuntimeError(f"test tried to reach the network: {address!r}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """Saved tiny pipelines, built once per session: tiny_pipeline_dir("sd15")."""
    from singlora_diffusion.tiny import save_tiny_pipeline

    cache = {}

    def get(arch: str = "sd15"):
        if arch not in cache:
            cache[arch] = save_tiny_pipeline(tmp_path_factory.mktemp(f"tiny_{arch}"), arch)
        return cache[arch]
    return get


_REPORT: list[str] = []


def report(line: str) -> None:
    """A line for the end-of-session summary (times and peak RSS of the real-size tier)."""
    _REPORT.append(line)


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("real-size tier: time and peak RSS")
        for line in _REPORT:
            terminalreporter.write_line(line)
