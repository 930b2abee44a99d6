"""Models: output shapes, no NaN, for 3 and 15 input channels (c = 0 and the paper's 5 slices)."""

import pytest
import torch

from src.cnn.model import build_model
from src.config import load_config


@pytest.mark.parametrize("arch", ["classifier", "multitask", "bloodnet"])
@pytest.mark.parametrize("context", [0, 2])
def test_forward_shapes_and_finite(arch, context):
    torch.manual_seed(0)
    cfg = load_config(None, [f"arch={arch}", f"context={context}", "backbone=resnet10t"])
    model = build_model(cfg).eval()
    x = torch.rand(2, cfg.in_chans, 64, 64)
    with torch.inference_mode():
        out = model(x, torch.full((2,), 2.5))
    assert cfg.in_chans == (3 if context == 0 else 15)
    assert out["logits"].shape == (2, 6) and torch.isfinite(out["logits"]).all()
    assert out["embedding"].ndim == 2 and out["embedding"].shape[0] == 2 and torch.isfinite(out["embedding"]).all()
    if arch != "classifier":
        assert out["seg_logits"].shape == (2, 1, 64, 64)
        assert (out["volume_mm3"] >= 0).all()


def test_pretrained_file_is_loaded_and_stem_adapted(tmp_path):
    """A local timm checkpoint for 3 channels loads into a 15-channel model (timm adapts the first conv)."""
    source = build_model(load_config(None, ["arch=classifier", "backbone=resnet10t", "context=0"]))
    path = tmp_path / "resnet10t.pth"
    torch.save(source.net.state_dict(), path)
    cfg = load_config(None, ["arch=classifier", "backbone=resnet10t", "context=2", f"pretrained_path={path}"])
    model = build_model(cfg)
    stem = model.net.conv1[0].weight
    assert stem.shape[1] == 15
    # timm repeats the 3-channel kernel over the new channels and rescales by 3/15.
    expected = source.net.conv1[0].weight.repeat(1, 5, 1, 1) * 3 / 15
    assert torch.allclose(stem, expected, atol=1e-6)
    deeper = dict(model.net.named_parameters())["layer1.0.conv1.weight"]
    assert torch.equal(deeper, dict(source.net.named_parameters())["layer1.0.conv1.weight"])


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    from src.errors import InputError

    cfg = load_config(None, ["backbone=resnet10t", f"pretrained_path={tmp_path / 'nope.pth'}"])
    with pytest.raises(InputError, match=r"nope\.pth: pretrained checkpoint not found"):
        build_model(cfg)


def fit_one_pixel_lines(full_res: bool, steps: int = 120) -> float:
    """Dice after fitting the decoder (encoder frozen) to a mask of alternate one-pixel rows drawn in the image."""
    torch.manual_seed(0)
    cfg = load_config(None, ["arch=multitask", "backbone=resnet10t", "context=0", f"seg_full_res={full_res}"])
    model = build_model(cfg).train()
    mask = torch.zeros(4, 1, 32, 32)
    mask[..., 1::2, :] = 1.0  # odd rows: blood and no blood one pixel apart
    image = (0.2 + 0.6 * mask).expand(-1, cfg.in_chans, -1, -1).contiguous()
    params = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(image)["seg_logits"], mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pred = (model.eval()(image)["seg_logits"] > 0).float()
    return float(2 * (pred * mask).sum() / (pred.sum() + mask.sum()))


def test_full_resolution_block_draws_what_a_half_resolution_map_cannot(one_torch_thread):
    """seg_full_res: a map at 1/2 upsampled bilinearly cannot tell rows one pixel apart (every output row mixes two
    map rows with weights 3/4 and 1/4, so no logits make odd rows positive and even rows negative); at full size the
    block can. (Sparser one-pixel lines a half-size logit map does paint: the test is about separation.)"""
    half, full = fit_one_pixel_lines(full_res=False), fit_one_pixel_lines(full_res=True)
    assert full > 0.95, full
    assert half < 0.8, half


@pytest.mark.parametrize("evidence_r", [0.0, 8.0])
@pytest.mark.parametrize("grad", [True, False])
def test_volume_feature_gradient_reaches_the_map_only_when_asked(grad, evidence_r):
    """volume_feature_grad=false: the classification loss cannot move the map (its only ways in are the volume
    feature and, with map_evidence_r, the pooled map), yet the head still reads them; true (the paper's): it can."""
    torch.manual_seed(0)
    cfg = load_config(None, ["arch=bloodnet", "backbone=resnet10t", "context=0", f"volume_feature_grad={grad}",
                             f"map_evidence_r={evidence_r}"])
    model = build_model(cfg).train()
    out = model(torch.rand(2, cfg.in_chans, 32, 32), torch.full((2,), 2.5))
    torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], torch.ones_like(out["logits"])).backward()
    seg_head_grad = model.seg_head.weight.grad
    reaches_map = seg_head_grad is not None and bool(seg_head_grad.abs().sum() > 0)
    assert reaches_map == grad
    n_map_features = 2 if evidence_r else 1
    assert model.head.weight.shape[1] == 512 + n_map_features  # resnet10t's pooled bottleneck, then the map's
    assert (model.head.weight.grad[:, -n_map_features:].abs().sum(dim=0) > 0).all()  # their columns still learn


def test_head_reads_the_volume_then_the_pooled_map():
    """map_evidence_r: the head's last two inputs are log1p(soft volume / 100 mm³) and the map's logits pooled by
    log-sum-exp at that sharpness; a map painting one bright blob raises the evidence far above a blank one's."""
    from src.cnn.losses import lse_pool
    from src.cnn.model import VOLUME_SCALE_MM3

    torch.manual_seed(0)
    model = build_model(load_config(None, ["backbone=resnet10t", "context=0", "map_evidence_r=8"])).eval()
    seen = {}
    model.head.register_forward_hook(lambda module, args, output: seen.update(head_input=args[0]))
    with torch.no_grad():
        out = model(torch.rand(3, 3, 32, 32), torch.full((3,), 2.5))
    volume_feature, evidence = seen["head_input"][:, -2], seen["head_input"][:, -1]
    torch.testing.assert_close(volume_feature, torch.log1p(out["volume_mm3"] / VOLUME_SCALE_MM3))
    torch.testing.assert_close(evidence, lse_pool(out["seg_logits"], 8.0))
    blank, blob = torch.full((2, 1, 32, 32), -6.0), torch.full((2, 1, 32, 32), -6.0)
    blob[1, :, 10:14, 10:14] = 4.0  # 16 of 1,024 pixels at p = 0.98
    assert lse_pool(blob, 8.0)[1] - lse_pool(blank, 8.0)[1] > 5.0


def test_multitask_reads_no_map_feature():
    """arch=multitask is BloodNet without the map feeding the head (the ablation's middle row): map_evidence_r
    does not add a column to it."""
    model = build_model(load_config(None, ["arch=multitask", "backbone=resnet10t", "context=0", "map_evidence_r=8"]))
    assert model.head.weight.shape[1] == 512


@pytest.mark.parametrize(("width", "expected"), [(0.125, [32, 16, 16, 16]), (0.25, [64, 32, 16, 16]),
                                               (0.5, [128, 64, 32, 32]), (1.0, [256, 128, 64, 64])])
def test_decoder_width_sets_every_level_but_never_under_the_floor(width, expected):
    """resnet10t's encoder levels carry 256, 128, 64 and 64 channels (deepest first, under the 512 bottleneck); 0.5
    is the decoder every run had before the key existed, and no level goes under 16 channels."""
    model = build_model(load_config(None, ["backbone=resnet10t", "context=0", f"decoder_width={width}"]))
    assert [block.block[0].out_channels for block in model.decoder] == expected
    out = model(torch.rand(2, 3, 64, 64), torch.full((2,), 1.0))
    assert out["seg_logits"].shape == (2, 1, 64, 64)


def test_decoder_width_out_of_range_is_a_config_error():
    from src.errors import InputError

    with pytest.raises(InputError, match="decoder_width"):
        load_config(None, ["decoder_width=0"])
