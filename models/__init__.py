"""Networks: the frozen text encoder, the timestep embedding and the conditional U-Net."""
