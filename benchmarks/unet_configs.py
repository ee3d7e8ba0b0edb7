"""UNet configs (diffusers keyword arguments) shared by the benchmarks, so they time the same models."""

UNET_CONFIGS = {
    # the built-in tiny model's UNet
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                 norm_num_groups=8, use_linear_projection=True, sample_size=16),
    # a small SD-2-like UNet: linear projections, per-block heads, two attention levels
    "small": dict(block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=128,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=(2, 4, 4), norm_num_groups=32, use_linear_projection=True, sample_size=32),
    # the SD layout at reduced width: 4 levels, 2 layers per block
    "sd-mini": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=256,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                    attention_head_dim=8, norm_num_groups=32, use_linear_projection=False, sample_size=32),
}
