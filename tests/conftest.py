import logging
import os

import pytest

# Nothing in the tests may reach the network: the hub client must answer from its cache or fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def sms_module():
    """The book's default split, built once (reading and tokenizing the file takes ~1 s)."""
    from spamclf.datamodule import SpamDataModule

    dm = SpamDataModule()
    dm.setup()
    return dm


@pytest.fixture
def caplog_info(caplog):
    caplog.set_level(logging.INFO)
    return caplog


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One trained gpt2-tiny run folder (checkpoints/last.ckpt, validation.csv, …), shared by the server, page
    and ONNX tests."""
    from spamclf.pipeline import run
    from tests.test_app import TINY, compose_cfg

    out = tmp_path_factory.mktemp("tiny-run")
    run(compose_cfg([*TINY, "test=false"], out))
    return out
