"""One fp32 state dict from a DeepSpeed checkpoint of any ZeRO stage."""

from __future__ import annotations

from pathlib import Path

import torch

DS_TAG = "ds"  # the tag every pretraining checkpoint is saved under


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Gather the fp32 master weights that ZeRO partitioned across ranks.

    Stage 0 checkpoints hold the whole module in ``mp_rank_00_model_states.pt``; stages 1-3
    keep fp32 weights in per-rank optimizer shards, merged by DeepSpeed's zero_to_fp32.
    Stage 3 names its module files per rank (``zero_pp_rank_0_mp_rank_00_model_states.pt``).
    """
    from unisrec.runtime import cpu_deepspeed, library_output

    cpu_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / DS_TAG).is_dir():
        raise FileNotFoundError(f"{checkpoint_dir}: no DeepSpeed checkpoint tagged {DS_TAG!r}")
    module_files = sorted((checkpoint_dir / DS_TAG).glob("*mp_rank_00_model_states.pt"))
    if not module_files:
        raise FileNotFoundError(f"{checkpoint_dir / DS_TAG}: no model states file")
    states = torch.load(module_files[0], map_location="cpu", weights_only=False)
    if not states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0):
        return {k: v.float() for k, v in states["module"].items()}
    with library_output():  # zero_to_fp32 prints each step of the merge
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=DS_TAG)
    return {k: v.float().contiguous() for k, v in state.items()}
