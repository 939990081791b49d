import os

import pytest
import torch

from tests.helpers import DEVICES, MODEL_AVAILABLE

# Two cores here and in CI: keep intra-op threads from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Tests that need SmolLM2 skip where the `models` extra is absent, except in CI (CI=true),
# which installs it: there a missing model is a failure, not a skip.
if os.environ.get("CI") == "true" and not MODEL_AVAILABLE:
    raise RuntimeError("CI=true but the SmolLM2 `models` extra is not installed (see README)")
if os.environ.get("CI") == "true" and MODEL_AVAILABLE:
    from vattention.models import gemma3

    if not gemma3.is_available():
        raise RuntimeError("CI=true but the `gemma3` extra is not installed (see README)")


@pytest.fixture(params=DEVICES)
def device(request):
    """cpu, and cuda (skipped without a GPU): a test written once runs on every backend."""
    return torch.device(request.param)
