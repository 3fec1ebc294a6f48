import pytest
import torch

from models.text_encoder import TextCondition, collate, null_condition
from models.unet import ConditionalUNet, UNetConfig

TINY = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, num_heads=2)


def random_condition(n, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return collate([(torch.randn(length, 384, generator=g), torch.randn(384, generator=g)) for _ in range(n)])


def trained_like(model):
    """Zero-initialised output layers make a fresh net ignore its inputs; randomise them for tests."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("size,channels,attn", [(32, 3, (16,)), (64, 3, (16,)), (32, 1, (16,)), (28, 1, (14,))])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shape_matches_input(size, channels, attn, learn_sigma):
    cfg = UNetConfig(image_size=size, in_channels=channels, attention_resolutions=attn, learn_sigma=learn_sigma, **TINY)
    model = ConditionalUNet(cfg)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]), random_condition(2))
    assert out.shape == (2, channels * (2 if learn_sigma else 1), size, size)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 0


def test_attention_happens_at_the_requested_resolutions():
    model = ConditionalUNet(UNetConfig(image_size=32, attention_resolutions=(16,), **TINY))
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
             for m in model.modules() if type(m).__name__ == "AttentionBlock"]
    model(torch.randn(1, 3, 32, 32), torch.tensor([5]), random_condition(1))
    for h in hooks:
        h.remove()
    assert set(sizes) == {16}  # two down-level blocks, the middle, and the up-level blocks


def test_changing_the_prompt_changes_the_output():
    model = trained_like(ConditionalUNet(UNetConfig(attention_resolutions=(16, 8), **TINY))).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([300, 300])
    a = model(x, t, random_condition(2, seed=1))
    b = model(x, t, random_condition(2, seed=2))
    c = model(x, t, null_condition(2))
    assert (a - b).abs().mean() > 1e-3 and (a - c).abs().mean() > 1e-3


def test_only_the_tokens_change_the_output_through_cross_attention():
    """Same pooled vector, different tokens: the difference must come through cross-attention."""
    model = trained_like(ConditionalUNet(UNetConfig(attention_resolutions=(16, 8), **TINY))).eval()
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([300])
    a, b = random_condition(1, seed=1), random_condition(1, seed=2)
    b = TextCondition(b.tokens, b.mask, a.pooled)
    assert (model(x, t, a) - model(x, t, b)).abs().mean() > 1e-4


def test_gradients_reach_the_cross_attention_weights():
    model = ConditionalUNet(UNetConfig(attention_resolutions=(16,), **TINY))
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), random_condition(2))
    torch.optim.SGD(model.parameters(), lr=1.0).zero_grad()
    ((out - torch.randn_like(out)) ** 2).mean().backward()
    # one optimiser step opens the zero-initialised output layers; then every cross-attention weight learns
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad.sign() if p.grad is not None else 0
    model.zero_grad()
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), random_condition(2))
    ((out - torch.randn_like(out)) ** 2).mean().backward()
    cross = {n: p.grad for n, p in model.named_parameters() if "cross_attn" in n and n.endswith("weight")}
    assert cross and all(g is not None and g.abs().sum() > 0 for g in cross.values()), \
        [n for n, g in cross.items() if g is None or g.abs().sum() == 0]


def test_padding_tokens_do_not_change_the_output():
    model = trained_like(ConditionalUNet(UNetConfig(attention_resolutions=(16, 8), **TINY))).eval()
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([400])
    cond = random_condition(1, length=4)
    garbage = torch.randn(1, 7, 384) * 10  # padding filled with large junk, masked out
    padded = TextCondition(torch.cat([cond.tokens, garbage], 1), torch.cat([cond.mask, torch.zeros(1, 7, dtype=torch.bool)], 1),
                           cond.pooled)
    torch.testing.assert_close(model(x, t, cond), model(x, t, padded), rtol=1e-5, atol=1e-5)
    unmasked = TextCondition(padded.tokens, torch.ones_like(padded.mask), cond.pooled)
    assert (model(x, t, cond) - model(x, t, unmasked)).abs().max() > 1e-4, "the mask must be what hides them"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: the CPU's small-attention path adds the weights too
def test_token_weights_are_the_bool_mask_at_0_and_1_and_fade_a_token_in_between(precision):
    model = trained_like(ConditionalUNet(UNetConfig(attention_resolutions=(16, 8), **TINY))).eval()
    x, t, cond = torch.randn(1, 3, 32, 32), torch.tensor([400]), random_condition(1, length=6)
    with_weights = lambda w: TextCondition(cond.tokens, torch.tensor([[1.0] * 5 + [w]]), cond.pooled)
    without_last = TextCondition(cond.tokens, torch.tensor([[True] * 5 + [False]]), cond.pooled)
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"), torch.inference_mode():
        out = lambda c: model(x, t, c).float()
        effect = (out(cond) - out(without_last)).abs().max().item()  # what the last token changes: 0.09 here
        # bf16: the same kernels on both sides came out equal here; a tenth of the effect leaves room for others
        tol = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=0, atol=0.1 * effect)
        torch.testing.assert_close(out(with_weights(0.0)), out(without_last), **tol)
        torch.testing.assert_close(out(with_weights(1.0)), out(cond), **tol)
        if precision == "fp32":  # the output moves steadily from one to the other as the weight grows
            ends = (out(cond) - out(without_last)).abs().mean()
            moved = [(out(with_weights(w)) - out(without_last)).abs().mean() / ends for w in (0.001, 0.25, 0.5, 0.75)]
            assert moved[0] < 0.01 and all(a < b for a, b in zip(moved, moved[1:])) and moved[-1] < 1, moved


def test_empty_prompt_is_a_learned_condition():
    model = trained_like(ConditionalUNet(UNetConfig(attention_resolutions=(16,), **TINY))).eval()
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([400])
    out = model(x, t, null_condition(1))
    assert torch.isfinite(out).all()
    with torch.no_grad():
        model.null_token.add_(1.0)
    assert (model(x, t, null_condition(1)) - out).abs().max() > 1e-4


def test_bad_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="image_size 30 must be divisible by 4"):
        UNetConfig(image_size=30, channel_mult=(1, 2, 2))
