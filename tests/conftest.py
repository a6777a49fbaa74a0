import pytest
import torch

from pipeline.env import apply_offline_defaults

apply_offline_defaults()
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
