"""The speed paths (bf16 attention on CPU, bf16 sampling, the channels_last layout) compute the same thing as the plain ones."""
import copy

import pytest
import torch
import torch.nn.functional as F

import diffusion as D
import samplers as S
from checkpoints import save_weights
from guidance import guided_denoiser
from models import cpu, modules
from models.cpu import native_bf16
from models.modules import GroupNorm, attention, group_norm
from models.text_encoder import null_condition
from models.unet import ConditionalUNet, UNetConfig
from pipeline import Pipeline, generate_images, load_model
from tests.gaussian_oracle import MU, marginal_cov
from tests.test_unet import TINY, random_condition, trained_like
from train_config import TrainConfig, adamw, autocast_dtype, load_optimizer_state


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
    denoiser = guided_denoiser(model, cond, null_condition(2), 3.0)
    run = lambda precision: S.sample(denoiser, diffusion, (2, 3, 32, 32), "dpmpp", 10, precision=precision,
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
    S.fast_denoiser(denoiser, x, "auto")(x, torch.zeros(3, dtype=torch.long))
    assert seen == [False]


def test_bf16_precision_runs_the_denoiser_under_autocast():
    """The Gaussian oracle's denoiser written as a matmul, which autocast runs in bf16: it must see autocast
    on (and its matmul come out bf16) for "bf16" only, and the samples differ slightly but stay close."""
    d = D.GaussianDiffusion.from_name("cosine", 1000)
    seen = []

    def denoiser(x, t):  # E[eps | x_t] = s C_t^{-1} (x_t - a MU), t shared by the batch
        abar = d.alphas_cumprod[int(t[0])]
        weight = ((1 - abar).sqrt() * torch.linalg.inv(marginal_cov(abar)[0])).to(x.dtype)
        eps = (x - (abar.sqrt() * MU).to(x.dtype)) @ weight.T
        seen.append((torch.is_autocast_enabled("cpu"), eps.dtype))
        return eps

    def run(precision, start):
        seen.clear()
        out = S.sample(denoiser, d, (4000, 2), "dpmpp", 10, precision=precision, start=start,
                       generator=torch.Generator().manual_seed(0))
        assert out.dtype == torch.float32
        return out, set(seen)

    (fp32, fp32_seen), (bf16, bf16_seen) = run("fp32", "floor"), run("bf16", "floor")
    assert fp32_seen == {(False, torch.float32)} and bf16_seen == {(True, torch.bfloat16)}
    diff = (fp32 - bf16).abs().mean().item()
    assert 0 < diff < 0.005, diff  # measured 0.001
    # Why start="floor" exists: at t = T-1 the x_0 estimate multiplies the denoiser's error by
    # sigma/alpha ~ e^10, so bf16 rounding alone moves the deterministic samples ~100x more (measured 0.15).
    assert (run("fp32", "T")[0] - run("bf16", "T")[0]).abs().mean() > 20 * diff


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_uses_bf16_exactly_where_it_pays_off(native, monkeypatch):
    monkeypatch.setattr(S, "bf16_pays_off", lambda device: native)
    seen = []
    denoiser = lambda x, t: (seen.append(torch.is_autocast_enabled("cpu")), torch.zeros_like(x))[1]
    x = torch.zeros(3, 2)
    S.fast_denoiser(denoiser, x, "auto")(x, torch.zeros(3, dtype=torch.long))
    assert seen == [native]


@pytest.mark.parametrize("has_bf16,isa,native", [(True, None, True), (True, "AVX512_CORE_BF16", True),
                                                  (True, "avx512_core_amx", True), (True, "AVX2", False),
                                                  (True, "AVX512_CORE", False), (False, None, False)])
def test_native_bf16_follows_the_cpu_and_the_isa_onednn_may_use(has_bf16, isa, native, monkeypatch):
    # capped below AVX512-BF16, oneDNN emulates bf16 far slower than fp32: sampling and training stay in fp32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
    if isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert native_bf16("cpu") is native and native_bf16("meta") is False


@pytest.mark.parametrize("native,has_amx,vendor,pays", [
    (True, True, "GenuineIntel", True), (True, False, "AuthenticAMD", True), (True, False, "", True),
    (True, False, "GenuineIntel", False), (False, False, "AuthenticAMD", False), (False, False, "GenuineIntel", False)])
def test_auto_precision_is_bf16_with_amx_or_on_non_intel_cpus_with_native_bf16(native, has_amx, vendor, pays,
                                                                              monkeypatch):
    # without AMX, bf16 trains 1.5x fp32 on an AMD EPYC but 0.7x on an Intel Xeon (docs/model_card.md)
    monkeypatch.setattr(cpu, "native_bf16", lambda device: native)
    monkeypatch.setattr(cpu, "amx", lambda device: has_amx)
    monkeypatch.setattr(cpu, "cpu_vendor", lambda: vendor)
    assert cpu.bf16_pays_off("cpu") is pays
    assert autocast_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if pays else None)
    assert S.runs_in_bf16("auto", torch.float32, "cpu") is pays and S.runs_in_bf16("bf16", torch.float32, "cpu")


def test_cpu_vendor_reads_cpuinfo_else_the_processor_string(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert cpu.cpu_vendor(str(info)) == "AuthenticAMD"
    monkeypatch.setattr(cpu.platform, "processor", lambda: "Intel64 Family 6 Model 143 Stepping 8, GenuineIntel")
    assert cpu.cpu_vendor(str(tmp_path / "absent")) == "GenuineIntel"
    monkeypatch.setattr(cpu.platform, "processor", lambda: "arm")
    assert cpu.cpu_vendor(str(tmp_path / "none")) == ""


CL = torch.channels_last


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_group_norm_hands_channels_last_back_in_channels_last_with_the_nchw_result(dtype, tol):
    norm = group_norm(64)
    x = torch.randn(2, 64, 8, 8, dtype=dtype)
    grad = torch.randn_like(x)
    results = []
    for layout in (torch.contiguous_format, CL):
        xl = x.clone(memory_format=layout).requires_grad_()
        y = norm(xl)
        y.backward(grad.contiguous(memory_format=layout))
        assert y.is_contiguous(memory_format=layout) and xl.grad.is_contiguous(memory_format=layout)
        results.append((y.detach().float(), xl.grad.float(), norm.weight.grad.clone()))
        norm.zero_grad()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("side,grad,copies", [(32, False, False), (16, False, True), (32, True, True)])
def test_group_norm_copies_a_channels_last_input_to_nchw_exactly_where_its_kernel_is_slow(side, grad, copies,
                                                                                         monkeypatch):
    # PyTorch's channels_last kernel: used without gradient on maps of CHANNELS_LAST_GROUP_NORM_MIN_PIXELS or more
    assert side * side >= modules.CHANNELS_LAST_GROUP_NORM_MIN_PIXELS or copies
    norm = group_norm(64).bfloat16()
    x = torch.randn(2, 64, side, side, dtype=torch.bfloat16)
    expected = norm(x).detach()
    relayouts = []
    real = modules._Relayout.apply
    monkeypatch.setattr(modules._Relayout, "apply", lambda *a: relayouts.append(1) or real(*a))
    with torch.set_grad_enabled(grad):
        y = norm(x.contiguous(memory_format=CL))
    assert bool(relayouts) is copies and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.detach().float(), expected.float(), rtol=0.02, atol=0.02)


def test_load_optimizer_state_lets_the_fused_adamw_resume_in_the_other_layout():
    # the fused kernel silently updates a parameter wrongly where its loaded state has another memory layout
    torch.manual_seed(0)
    grads = [torch.randn(8, 4, 3, 3) for _ in range(2)]
    saved = torch.nn.Parameter(torch.randn(8, 4, 3, 3).contiguous(memory_format=CL))
    saved.grad = grads[0].contiguous(memory_format=CL)
    saved_opt = torch.optim.AdamW([saved], lr=0.1, fused=True)
    saved_opt.step()
    resumed = {}
    for fix in (False, True):
        param = torch.nn.Parameter(saved.detach().contiguous())
        opt = torch.optim.AdamW([param], lr=0.1, fused=True)
        state_dict = copy.deepcopy(saved_opt.state_dict())  # as from a file: no tensor shared
        if fix:
            load_optimizer_state(opt, state_dict)
            assert all(v.stride() == param.stride() for v in opt.state[param].values() if v.dim())
        else:
            opt.load_state_dict(state_dict)
        param.grad = grads[1].clone()
        opt.step()
        resumed[fix] = param.detach()
    saved.grad = grads[1].contiguous(memory_format=CL)
    saved_opt.step()
    torch.testing.assert_close(resumed[True], saved.detach(), rtol=1e-6, atol=1e-6)
    assert (resumed[False] - saved.detach()).abs().max() > 1e-3, "the reference no longer shows the fault"


def test_the_unet_computes_the_same_function_in_channels_last_and_keeps_that_layout_inside():
    model = trained_like(ConditionalUNet(UNetConfig(attention_resolutions=(16,), **TINY)))
    x, t, cond = torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), random_condition(2)
    runs = []
    for layout in (torch.contiguous_format, CL):
        model.to(memory_format=layout).zero_grad()
        seen = []
        hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=layout)))
                 for m in model.modules() if isinstance(m, GroupNorm)]
        out = model(x, t, cond)
        out.square().mean().backward()
        for h in hooks:
            h.remove()
        assert out.is_contiguous() and seen and all(seen), "every GroupNorm sees the model's layout"
        runs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("sampler", sorted(S.SAMPLERS))
def test_every_sampler_draws_the_same_images_with_the_model_in_either_layout(sampler):
    model = trained_like(ConditionalUNet(UNetConfig(attention_resolutions=(16,), **TINY))).eval()
    diffusion = D.GaussianDiffusion.from_name("cosine", 100)
    drawn = []
    for layout in (torch.contiguous_format, CL):
        model.to(memory_format=layout)
        drawn.append(generate_images(model, diffusion, random_condition(2), sampler, 5, 3.0, seed=0, precision="fp32"))
    assert drawn[0].is_contiguous() and drawn[1].is_contiguous()
    diff = (drawn[0] - drawn[1]).abs()  # fp32 rounding; a pixel near x0's clipping edge may move a little more
    assert diff.mean() < 1e-4 and diff.max() < 0.02, (diff.mean(), diff.max())


@pytest.mark.parametrize("has_amx,isa,expected", [(True, None, True), (True, "AVX512_CORE_AMX", True),
                                                   (True, "avx10_1_512_amx_fp16", True), (True, "ALL", True),
                                                   (True, "AVX512_CORE_BF16", False), (True, "AVX2", False),
                                                   (False, None, False)])
def test_amx_follows_the_cpu_and_the_isa_onednn_may_use(has_amx, isa, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has_amx)
    if isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert cpu.amx("cpu") is expected and cpu.amx("meta") is False


@pytest.mark.parametrize("has_amx,dtype,layout", [(True, torch.bfloat16, CL), (True, None, torch.contiguous_format),
                                                  (False, torch.bfloat16, torch.contiguous_format)])
def test_training_runs_in_channels_last_exactly_for_bf16_with_amx(has_amx, dtype, layout, monkeypatch):
    monkeypatch.setattr(cpu, "amx", lambda device: has_amx)
    assert cpu.training_memory_format("cpu", dtype) == layout


@pytest.mark.parametrize("native,has_amx,image_size,patch_size,fast", [
    (True, False, 32, 1, True), (True, False, 32, 2, True), (True, False, 64, 1, False), (True, True, 64, 1, True),
    (False, False, 32, 1, False)])
def test_a_loaded_model_samples_in_channels_last_exactly_where_that_was_measured_faster(native, has_amx, image_size,
                                                                                        patch_size, fast, monkeypatch,
                                                                                        tmp_path):
    # channels_last where bf16 pays off: with AMX on any map, else on maps up to CHANNELS_LAST_MAX_MAP a side
    monkeypatch.setattr(cpu, "bf16_pays_off", lambda device: native)
    monkeypatch.setattr(cpu, "amx", lambda device: has_amx)
    feature_map = image_size // patch_size
    assert cpu.sampling_memory_format("cpu", feature_map) == (CL if fast else torch.contiguous_format)
    path = tmp_path / "model.safetensors"
    cfg = UNetConfig(image_size=image_size, patch_size=patch_size, attention_resolutions=(feature_map // 2,), **TINY)
    save_weights(ConditionalUNet(cfg).state_dict(),
                 {"config": {"unet": cfg.to_dict(), "schedule": "cosine", "timesteps": 100}, "info": {}}, path)
    model = load_model(path)[0]
    weight = model.input_conv.weight
    assert weight.is_contiguous(memory_format=CL) is fast and weight.is_contiguous() is not fast


def test_training_takes_the_fused_adamw_whose_steps_match_the_default_one():
    """The fused kernel (train_config.adamw on CPU) against PyTorch's default foreach AdamW as the reference:
    five steps of the same gradients land on the same weights within float rounding."""
    cfg = TrainConfig(lr=1e-2, weight_decay=0.01)
    model = lambda: trained_like(torch.manual_seed(0) and ConditionalUNet(UNetConfig(**TINY)))
    fused_model, plain_model, start_model = model(), model(), model()
    fused = adamw(fused_model.parameters(), cfg, torch.device("cpu"))
    plain = torch.optim.AdamW(plain_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    assert fused.defaults["fused"] is True
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for a, b in zip(fused_model.parameters(), plain_model.parameters()):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    moved = 0.0
    for a, b, start in zip(fused_model.parameters(), plain_model.parameters(), start_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved = max(moved, (a - start).abs().max().item())
    assert moved > 0.04, "five steps at lr 1e-2 move the weights"


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_bf16_layer_copy_computes_exactly_what_autocast_computes(layout):
    cfg = UNetConfig(attention_resolutions=(16,), style_words=("noto", "openmoji"), **TINY)
    model = trained_like(ConditionalUNet(cfg)).eval().requires_grad_(False).to(memory_format=layout)
    twin = cpu.bf16_layer_copy(model)
    x, t = torch.randn(2, 3, cfg.image_size, cfg.image_size), torch.tensor([10, 900])
    cond = random_condition(2)._replace(style=torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(twin(x, t, cond), model(x, t, cond))
    layers = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, cpu.AUTOCAST_BF16_LAYERS)
              for p, _ in m.named_parameters(recurse=False)}
    assert {n for n, p in twin.named_parameters() if p.dtype == torch.bfloat16} == layers and len(layers) > 10
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the model itself is left as it was"
    assert twin.input_conv.weight.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("native", [True, False])
def test_pipeline_samples_bf16_with_its_bf16_layer_copy_and_the_same_images(native, monkeypatch):
    monkeypatch.setattr(S, "bf16_pays_off", lambda device: native)
    model = trained_like(ConditionalUNet(UNetConfig(attention_resolutions=(16,), **TINY))).eval().requires_grad_(False)
    pipe = Pipeline(model, D.GaussianDiffusion.from_name("cosine", 100), encoder=None)
    assert pipe.sampling_model("fp32") is model and pipe.sampling_model("auto", torch.float64) is model
    twin = pipe.sampling_model("auto")
    assert (twin is not model) is native and pipe.sampling_model("bf16") is pipe.sampling_model("bf16")
    monkeypatch.setattr(pipe, "condition", lambda prompts: random_condition(len(prompts)))
    drawn = pipe.generate(["a", "b"], "dpmpp", 4, 3.0, seed=1, precision="bf16")
    assert torch.equal(drawn, generate_images(model, pipe.diffusion, random_condition(2), "dpmpp", 4, 3.0, seed=1,
                                              precision="bf16"))
