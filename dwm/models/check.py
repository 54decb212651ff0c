"""Check a downloaded checkpoint against the model it is for, without loading anything else.

    python -m dwm.models.check model=ctsd_35_xs model.checkpoint=/path/ctsd_35_xs_df6v3_tirda_bm_nwao_60k.pth

Builds the denoiser of the config on the meta device (no memory), reads the file (.pth with
weights_only, or .safetensors), and compares every key and shape. Prints the key and
parameter counts; exits 0 when the file fits exactly, 1 naming every missing, unexpected or
mis-shaped key, 2 when the config or the file cannot be read. No text encoders or VAE needed.
"""

from __future__ import annotations

import sys

import torch

from dwm.config import ConfigError, compose, instantiate, require_file
from dwm.models.checkpoint import CheckpointError, compare, model_shapes, read_state_dict


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = compose(args)
        path = require_file(cfg, "model.checkpoint")
        with torch.device("meta"):
            model = instantiate(cfg, "model.denoiser")
        state = read_state_dict(path)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    expected = model_shapes(model)
    buffers = {name for name, _ in model.named_buffers()}
    params = sum(v.numel() for k, v in state.items() if k not in buffers)
    print(f"model {cfg.model.name}: {len(expected)} keys, {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"{path}: {len(state)} keys, {params:,} parameters (buffers aside)")
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    print(f"dtypes in the file: {', '.join(dtypes)}")
    report = compare(expected, state)
    if report.ok:
        print("ok: every key and shape matches; the file loads strictly")
        return 0
    print(f"the file does not fit the model:\n{report}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
