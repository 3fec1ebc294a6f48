"""Deepening a trained U-Net keeps its function and leaves the new blocks trainable."""
import pytest
import torch

from models.growth import deepen
from models.text_encoder import TextCondition
from models.unet import ConditionalUNet, UNetConfig

SMALL = UNetConfig(image_size=16, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                   attention_resolutions=(8, 4), num_heads=2, patch_size=1)


def trained_like(cfg: UNetConfig, seed: int = 1) -> ConditionalUNet:
    """A model with every weight random, zero-initialised ones included, as after training."""
    torch.manual_seed(seed)
    model = ConditionalUNet(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def inputs(cfg: UNetConfig, b: int = 3):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[0, 3:] = False
    cond = TextCondition(torch.randn(b, 5, cfg.context_dim, generator=g), mask, torch.randn(b, cfg.context_dim, generator=g))
    return x, torch.tensor([3, 500, 999]), cond


@pytest.mark.parametrize("old_n,new_n", [(1, 2), (1, 3), (2, 3)])
def test_deepened_model_computes_the_same_function(old_n, new_n):
    cfg = UNetConfig(**{**SMALL.to_dict(), "num_res_blocks": old_n})
    old = trained_like(cfg)
    weights, new_cfg = deepen(old.state_dict(), cfg, new_n)
    assert new_cfg.num_res_blocks == new_n
    new = ConditionalUNet(new_cfg).eval()
    new.load_state_dict(weights)  # strict: every key of the deeper model, no leftovers
    assert new.num_parameters() > old.num_parameters()
    with torch.no_grad():
        x, t, cond = inputs(cfg)
        expected, got = old(x, t, cond), new(x, t, cond)
    assert expected.abs().mean() > 0.1, "the check must compare a real output"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_new_blocks_learn_and_then_change_the_output():
    old = trained_like(SMALL)
    weights, new_cfg = deepen(old.state_dict(), SMALL, 2)
    new = ConditionalUNet(new_cfg)
    new.load_state_dict(weights)
    x, t, cond = inputs(SMALL)
    new(x, t, cond).square().mean().backward()
    for prefix in ("down.0.blocks.1.res.conv2", "up.0.blocks.1.res.conv2", "up.1.blocks.1.attn.self_attn.proj"):
        grad = dict(new.named_parameters())[f"{prefix}.weight"].grad
        assert grad is not None and grad.abs().sum() > 0, f"{prefix} gets no gradient"
    with torch.no_grad():
        before = new(x, t, cond)
        new.down[0].blocks[1].res.conv2.weight.add_(0.1)
        assert not torch.allclose(new(x, t, cond), before), "the new block is wired into the network"


def test_deepen_refuses_fewer_blocks():
    with pytest.raises(ValueError, match="can only add residual blocks: the model has 2 per level, asked for 1"):
        deepen(ConditionalUNet(UNetConfig(**{**SMALL.to_dict(), "num_res_blocks": 2})).state_dict(),
               UNetConfig(**{**SMALL.to_dict(), "num_res_blocks": 2}), 1)
