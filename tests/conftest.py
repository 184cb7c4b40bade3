import os

# Tests never reach a model hub; wandb never reaches a server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Under pytest-xdist (make test: two workers on two cores) each worker and every process it starts compute
# on one thread. Two workers of two OpenMP threads each oversubscribe the cores, and OpenMP's busy waiting
# then slows training many-fold: the full shapes run (about 15 minutes on one thread beside another
# worker) passed its 30-minute limit in CI. Set before any test imports torch; subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
