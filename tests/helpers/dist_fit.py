"""Worker for tests/test_distributed.py: `torchrun --nproc_per_node=2 dist_fit.py OUT [RUN_DIR]`.

Each rank fits the same noise on the same data; rank r writes its final noise parameters to
OUT/rank{r}.safetensors. The run directory (if given) is written by rank 0 alone.
"""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import tl_noise as tn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import HOOKS, TINY, tiny_data  # noqa: E402

from tl_noise.fitting import fit

CONFIG = TINY  # the test suite's tiny native model (tests/conftest.py)


def data():
    return tiny_data(mask_from=4)


def run(run_dir=None, quiet=True, kind=None):
    """``kind``: "nodes" (noise on every hook_z) or "edges" (default: $TL_NOISE_DIST_KIND)."""
    torch.set_num_threads(1)
    model = tn.build_native_model(CONFIG)
    for p in model.parameters():
        p.requires_grad_(False)
    tokens, mask = data()
    kind = kind or os.environ.get("TL_NOISE_DIST_KIND", "nodes")
    if kind == "edges":
        attached = tn.attach_edge_noise(model, calibration_tokens=tokens)
    else:
        attached = tn.attach_noise(model, HOOKS, calibration_tokens=tokens)
    with attached as noise:
        fit(
            model,
            noise,
            tokens,
            loss_mask=mask,
            steps=4,
            batch_size=8,
            lr=0.05,
            quiet=quiet,
            run_dir=run_dir,
        )
        return {k: v.detach().clone() for k, v in noise.state_dict().items()}


if __name__ == "__main__":
    import torch.distributed as dist

    state = run(sys.argv[2] if len(sys.argv) > 2 else None, quiet=False)
    save_file(state, f"{sys.argv[1]}/rank{dist.get_rank()}.safetensors")
    dist.destroy_process_group()
