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
