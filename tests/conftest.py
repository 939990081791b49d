import os

import pytest
import torch

# Two cores here and in CI: keep intra-op threads from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

def _model_available() -> bool:
    from vattention.models import smollm2

    return smollm2.is_available()


# Tests that need SmolLM2 skip where the `models` extra is absent, except in CI (CI=true),
# which installs it: there a missing model is a failure, not a skip.
if os.environ.get("CI") == "true" and not _model_available():
    raise RuntimeError("CI=true but the SmolLM2 `models` extra is not installed (see README)")
requires_model = pytest.mark.skipif(not _model_available(),
                                    reason="SmolLM2 `models` extra not installed")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
