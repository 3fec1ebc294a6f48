"""The speed paths (bf16 attention on CPU, bf16 sampling) compute the same thing as the plain ones."""
import pytest
import torch
import torch.nn.functional as F

import diffusion as D
from models.modules import attention
from models.text_encoder import null_condition
from models.unet import ConditionalUNet, UNetConfig
from tests.test_unet import TINY, random_condition, trained_like


@pytest.mark.parametrize("keys", [64, 13])
def test_small_bf16_attention_matches_the_fused_kernel(keys):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 32, generator=g, requires_grad=True) for n in (64, keys, keys))
    mask = torch.rand(2, 1, 1, keys, generator=g) > 0.3
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (ref_grad,) = torch.autograd.grad(ref.sum(), q)
    with torch.autocast("cpu", torch.bfloat16):
        out = attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(out.float().sum(), q)
    torch.testing.assert_close(out.float(), ref, atol=0.03, rtol=0.03)
    torch.testing.assert_close(grad, ref_grad, atol=0.05, rtol=0.05)
    # masked keys get exactly zero weight: junk in them changes nothing
    k2, v2 = k.detach().clone(), v.detach().clone()
    hidden = ~mask[:, 0, 0, None, :, None].expand(-1, 4, -1, 32)
    k2[hidden], v2[hidden] = 1e4, -1e4
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(attention(q, k2, v2, mask), attention(q, k.detach(), v.detach(), mask))


def test_fp32_attention_is_the_fused_kernel():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    assert torch.equal(attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v))


def test_bf16_sampling_is_close_to_fp32():
    model = trained_like(ConditionalUNet(UNetConfig(attention_resolutions=(16,), **TINY))).eval()
    diffusion = D.GaussianDiffusion.from_name("cosine", 1000)
    cond = random_condition(2)
    denoiser = D.guided_denoiser(model, cond, null_condition(2), 3.0)
    run = lambda precision: D.sample(denoiser, diffusion, (2, 3, 32, 32), "dpmpp", 10, precision=precision,
                                     generator=torch.Generator().manual_seed(0), clip_x0=True)
    with torch.inference_mode():
        fp32, bf16 = run("fp32"), run("bf16")
    assert fp32.dtype == bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().mean() < 0.02, (fp32 - bf16).abs().mean()
    with pytest.raises(ValueError, match="precision"):
        run("fp8")


def test_auto_precision_leaves_float64_alone():
    seen = []
    denoiser = lambda x, t: (seen.append(torch.is_autocast_enabled("cpu")), torch.zeros_like(x))[1]
    x = torch.zeros(3, 2, dtype=torch.float64)
    D.fast_denoiser(denoiser, x, "auto")(x, torch.zeros(3, dtype=torch.long))
    assert seen == [False]
