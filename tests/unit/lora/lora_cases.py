"""Adapter targets and block prefixes of the tiny models, shared by the LoRA tests."""

TARGETS = {
    "flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
             "proj_mlp", "proj_out"],
    "pixart": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    "latte": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
}
BLOCKS = {
    "flux": ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
             "single_transformer_blocks.1"],
    "pixart": ["transformer_blocks.0", "transformer_blocks.1"],
    "latte": ["transformer_blocks.0", "transformer_blocks.1", "temporal_transformer_blocks.0",
              "temporal_transformer_blocks.1"],
}
