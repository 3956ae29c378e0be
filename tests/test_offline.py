"""The suite runs offline: hub lookups are disabled and outbound sockets fail."""
import os
import socket

import pytest


def test_hub_is_offline_for_tests():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE


def test_outbound_connections_fail():
    with socket.socket() as s, pytest.raises(RuntimeError, match="reach the network"):
        s.connect(("203.0.113.1", 443))  # TEST-NET-3: never routed


def test_loading_a_hub_id_does_not_download():
    from singlora_diffusion.pipelines import load_pipeline

    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        load_pipeline("runwayml/stable-diffusion-v1-5")
