import os

# Set before torch is imported: with OpenMP's default "active" waiting, an idle thread spins on
# its core, and on a 2-core machine tiny forwards become 10x slower whenever anything else runs
# (measured: 0.02 s of CPU per tiny UNet forward with one thread, 0.4-1.5 s with two under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run through Triton's CPU interpreter. Triton reads this variable
# when it is first imported (diffusers, transformers and torch._dynamo import it), so it must be
# set here, before any test module loads; tests/test_flash_attention.py can then run in-process.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never touch the network: any hub lookup must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Two cores: keep torch from oversubscribing them when pytest runs in parallel with other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
