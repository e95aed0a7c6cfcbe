"""Views: shapes, empirical parameter ranges, each op against a reference, determinism, large-image path, CLI."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import kornia
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from protoclr import views
from protoclr.data import LabeledImages, load_dataset
from protoclr.views import (
    MODIFIERS,
    PRESETS,
    CropViews,
    eval_images,
    make_views,
    sample_params,
    uniforms,
    view_spec,
)

G = torch.Generator().manual_seed(0)
IMAGES = {
    "simclr": torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8, generator=G),
    "simclr_cifar": torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=G),
    "simclr_small": torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=G),
}
PLAIN = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0, flip_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _views(x, spec, *, V=2, seed=0, epoch=0, idx=None, **kw):
    idx = torch.arange(x.shape[-4]) if idx is None else idx
    return make_views(x, spec, num_views=V, seed=seed, epoch=epoch, indices=idx, **kw)


def _params(spec, n=20000, *, H=32, W=32, V=1, seed=0):
    return sample_params(spec, height=H, width=W, num_views=V, seed=seed, epoch=0, indices=torch.arange(n))


# --------------------------------------------------------------------------------------------------------
# tables, shapes, configs


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("modifier", [None, *MODIFIERS])
def test_preset_shapes_and_dtypes(preset, modifier):
    spec = view_spec(preset, [modifier] if modifier else [])
    x = IMAGES[preset]
    v = _views(x, spec, V=3)
    s, C = spec.size, spec.channels
    assert v.shape == (3, x.shape[0], C, s, s) and v.dtype == torch.float32 and v.device == x.device
    assert torch.isfinite(v).all()
    e = eval_images(x, spec)
    assert e.shape == (x.shape[0], C, s, s) and e.dtype == torch.float32


def test_presets_follow_simclr():
    s = PRESETS["simclr"]
    assert (s.size, s.crop_scale, s.flip_p, s.jitter_p, s.gray_p, s.blur_p, s.blur_sigma) == (
        224,
        (0.08, 1.0),
        0.5,
        0.8,
        0.2,
        0.5,
        (0.1, 2.0),
    )
    assert (s.brightness, s.contrast, s.saturation, s.hue) == (0.8, 0.8, 0.8, 0.2)  # strength 1
    c = PRESETS["simclr_cifar"]
    assert (c.size, c.brightness, c.hue, c.blur_p) == (32, 0.4, 0.1, 0.0)  # strength 0.5, no blur
    assert PRESETS["simclr_small"].size == 28 and PRESETS["simclr_small"].channels == 1
    assert views.blur_kernel_size(s) == 23  # SimCLR: 10% of 224, odd


@pytest.mark.parametrize("name", list(MODIFIERS))
def test_modifiers_change_what_they_name(name):
    base = replace(PRESETS["simclr"], rotation_p=0.0, cutout_p=0.0)
    m = MODIFIERS[name](base)
    changed = {k for k in vars(base) if getattr(base, k) != getattr(m, k)}
    expected = {
        "no_blur": {"blur_p"},
        "add_rotation": {"rotation_p", "rotation_degrees"},
        "add_rotation_90": {"rotation_p", "rotation_degrees", "rotation_step"},
        "no_color": {"jitter_p", "gray_p"},
        "add_cutout": {"cutout_p"},
    }[name]
    assert changed == expected
    assert (m.blur_p == 0) if name == "no_blur" else True
    assert (m.jitter_p == 0 and m.gray_p == 0) if name == "no_color" else True
    assert (m.rotation_p > 0 and m.rotation_degrees > 0) if name == "add_rotation" else True
    assert (m.cutout_p > 0) if name == "add_cutout" else True


def test_view_spec_overrides_and_errors():
    s = view_spec("simclr_cifar", ["no_color", "add_cutout"], crop_scale=[0.2, 1.0], size=24, cutout_p=1)
    assert s.crop_scale == (0.2, 1.0) and s.size == 24 and s.cutout_p == 1.0 and s.jitter_p == 0.0
    assert view_spec("simclr", "no_blur").blur_p == 0.0
    for kwargs, match in [
        ({"preset": "moco"}, "unknown view preset"),
        ({"modifiers": ["no_flip"]}, "unknown view modifier"),
        ({"crop_size": 3}, "unknown ViewSpec field"),
        ({"size": 3.5}, "must be an int"),
        ({"flip_p": "half"}, "must be a number"),
        ({"flip_p": 1.5}, "probability"),
        ({"crop_scale": (0.9, 0.1)}, "crop_scale"),
        ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
        ({"blur_sigma": 2.0}, "sequence"),
        ({"hue": 0.7}, "hue"),
        ({"mean": (0.5, 0.5), "std": (0.5, 0.5)}, "mean/std"),
    ]:
        with pytest.raises(ValueError, match=match):
            view_spec(**{"preset": "simclr", **kwargs})


# --------------------------------------------------------------------------------------------------------
# randomness: the counter hash and the parameter distributions


def test_uniforms_are_uniform_and_independent():
    u = uniforms(seed=0, epoch=0, indices=torch.arange(4000), num_views=2)  # (2, 4000, S)
    assert u.shape == (2, 4000, views.NUM_SLOTS) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.005
    flat = u.permute(2, 0, 1).reshape(views.NUM_SLOTS, -1)  # slots x samples
    corr = torch.corrcoef(flat) - torch.eye(views.NUM_SLOTS)
    assert corr.abs().max() < 0.05
    # neighbouring indices, views, epochs and seeds are unrelated
    for other in [
        uniforms(seed=0, epoch=1, indices=torch.arange(4000), num_views=2),
        uniforms(seed=1, epoch=0, indices=torch.arange(4000), num_views=2),
        uniforms(seed=0, epoch=0, indices=torch.arange(1, 4001), num_views=2),
    ]:
        assert abs(torch.corrcoef(torch.stack([u.flatten(), other.flatten()]))[0, 1]) < 0.02
    assert abs(torch.corrcoef(torch.stack([u[0].flatten(), u[1].flatten()]))[0, 1]) < 0.02
    big = uniforms(seed=2**40 + 5, epoch=3, indices=torch.tensor([2**31 + 7]), num_views=1)
    assert torch.isfinite(big).all() and big.min() >= 0


def test_crop_parameters_stay_in_range():
    spec = view_spec("simclr", size=32)
    for H, W in [(32, 32), (40, 64)]:
        box = _params(spec, H=H, W=W).boxes[0]  # (n, 4)
        x0, y0, w, h = box.unbind(-1)
        frac = w * h / (H * W)
        ratio = w / h
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= W + 1e-3).all() and (y0 + h <= H + 1e-3).all()
        assert frac.min() >= 0.08 - 1e-4 and frac.max() <= 1.0 + 1e-4
        assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
        # same distribution as torchvision's rejection sampling (on a 10x larger image to make its rounding small)
        torch.manual_seed(0)
        tv = torch.tensor(
            [
                T.RandomResizedCrop.get_params(torch.empty(1, 10 * H, 10 * W), [0.08, 1.0], [3 / 4, 4 / 3])
                for _ in range(5000)
            ],
            dtype=torch.float32,
        )  # (n, 4) = top, left, h, w
        tv_frac = tv[:, 2] * tv[:, 3] / (100 * H * W)
        assert abs(frac.mean() - tv_frac.mean()) < 0.015 and abs(frac.std() - tv_frac.std()) < 0.015
    narrow = _params(view_spec("simclr", crop_scale=(0.3, 0.5)), H=32, W=32).boxes[0]
    f = narrow[:, 2] * narrow[:, 3] / 1024
    assert f.min() >= 0.3 - 1e-4 and f.max() <= 0.5 + 1e-4 and abs(f.mean().item() - 0.4) < 0.01
    # centers spread over the whole image
    cx = (narrow[:, 0] + narrow[:, 2] / 2) / 32
    assert cx.min() < 0.35 and cx.max() > 0.65


def test_rates_and_ranges_over_many_samples():
    spec = view_spec("simclr", ["add_rotation", "add_cutout"], flip_p=0.3, gray_p=0.2, jitter_p=0.8, blur_p=0.5)
    p = _params(spec, n=20000)
    tol = 4 * math.sqrt(0.25 / 20000)  # 4 standard errors
    assert abs(p.flip.float().mean().item() - 0.3) < tol
    assert abs(p.gray.float().mean().item() - 0.2) < tol
    assert abs(p.jitter.float().mean().item() - 0.8) < tol
    assert abs(p.blur.float().mean().item() - 0.5) < tol
    assert abs(p.cutout.float().mean().item() - spec.cutout_p) < tol
    assert abs((p.angle != 0).float().mean().item() - spec.rotation_p) < tol
    for name, lo, hi in [
        ("brightness", 0.2, 1.8),
        ("contrast", 0.2, 1.8),
        ("saturation", 0.2, 1.8),
        ("hue", -0.2, 0.2),
        ("sigma", 0.1, 2.0),
    ]:
        t = getattr(p, name)
        assert t.min() >= lo - 1e-6 and t.max() <= hi + 1e-6
        assert t.min() < lo + 0.05 * (hi - lo) and t.max() > hi - 0.05 * (hi - lo)  # fills the range
    a = p.angle[p.angle != 0]
    assert a.abs().max() <= spec.rotation_degrees and a.abs().max() > 0.95 * spec.rotation_degrees
    assert torch.bincount(p.order.flatten(), minlength=24).min() > 20000 / 24 * 0.8  # all 24 jitter orders
    cb = p.cutout_boxes[0]
    area = cb[:, 2] * cb[:, 3] / spec.size**2
    assert area.min() >= 0.02 - 1e-4 and area.max() <= 0.33 + 1e-4
    assert (cb[:, 0] >= 0).all() and (cb[:, 0] + cb[:, 2] <= spec.size + 1e-3).all()


def test_empirical_rates_on_pixels():
    x = torch.randint(0, 256, (2000, 3, 8, 8), dtype=torch.uint8, generator=G)
    spec = view_spec(
        "simclr_cifar", size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **{**PLAIN, "gray_p": 0.25, "flip_p": 0.4}
    )
    v = _views(x, spec, V=1)[0]
    xf = x.float() / 255
    gray = (v[:, 0] == v[:, 1]).all(-1).all(-1) & (v[:, 1] == v[:, 2]).all(-1).all(-1)
    luma = 0.299 * xf[:, 0] + 0.587 * xf[:, 1] + 0.114 * xf[:, 2]
    flipped = (v[:, 0] - luma.flip(-1)).abs().amax((-1, -2)).lt(1e-5) | (v - xf.flip(-1)).abs().amax((1, 2, 3)).lt(1e-5)
    assert abs(gray.float().mean().item() - 0.25) < 0.05
    assert abs(flipped.float().mean().item() - 0.4) < 0.05


# --------------------------------------------------------------------------------------------------------
# each op against a reference


def test_crop_flip_rotate_match_exact_references():
    x = torch.rand(1, 3, 24, 24, generator=G)
    box = torch.tensor([[4.0, 2.0, 16.0, 16.0]])
    no, yes = torch.tensor([False]), torch.tensor([True])
    crop = views._affine_crop(x, box, no, torch.zeros(1), 16)
    assert torch.allclose(crop, x[..., 2:18, 4:20], atol=1e-5)  # whole-pixel box at its own size: a copy
    assert torch.allclose(views._affine_crop(x, box, yes, torch.zeros(1), 16), x[..., 2:18, 4:20].flip(-1), atol=1e-5)
    full = torch.tensor([[0.0, 0.0, 24.0, 24.0]])
    r90 = views._affine_crop(x, full, no, torch.tensor([90.0]), 24)
    assert torch.allclose(r90, torch.rot90(x, 1, (-2, -1)), atol=1e-4) or torch.allclose(
        r90, torch.rot90(x, -1, (-2, -1)), atol=1e-4
    )
    down = views._affine_crop(x, full, no, torch.zeros(1), 12)  # half size: bilinear at 2x2 block centres
    assert torch.allclose(down, torch.nn.functional.avg_pool2d(x, 2), atol=1e-5)


def test_rotation_direction_matches_torchvision():
    x = torch.zeros(1, 1, 21, 21)
    x[..., 2:5, 10] = 1.0  # a dot above the centre
    full = torch.tensor([[0.0, 0.0, 21.0, 21.0]])
    ours = views._affine_crop(x, full, torch.tensor([False]), torch.tensor([90.0]), 21)
    ref = TF.rotate(x, 90.0)  # counter-clockwise

    def centre_of_mass(img):
        ys, xs = torch.meshgrid(torch.arange(21.0), torch.arange(21.0), indexing="ij")
        return torch.stack([(img * ys).sum(), (img * xs).sum()]) / img.sum()

    assert torch.allclose(centre_of_mass(ours[0, 0]), centre_of_mass(ref[0, 0]), atol=1.0)  # moved left, not right
    assert centre_of_mass(ours[0, 0])[1] < 6


def test_gray_and_normalise_exact():
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=G)
    spec = view_spec("simclr_cifar", size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **{**PLAIN, "gray_p": 1.0})
    v = _views(x, spec, V=1)[0]
    xf = x.float() / 255
    luma = 0.299 * xf[:, 0] + 0.587 * xf[:, 1] + 0.114 * xf[:, 2]
    assert torch.allclose(v, luma[:, None].expand(-1, 3, -1, -1), atol=1e-5)
    spec2 = replace(spec, gray_p=0.0, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    ref = (xf - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) / torch.tensor([0.2, 0.25, 0.5])[:, None, None]
    assert torch.allclose(_views(x, spec2, V=1)[0], ref, atol=1e-5)
    assert torch.allclose(eval_images(x, spec2), ref, atol=1e-5)  # eval at native size: normalise only


def _single_op(op: str, strength: float, x: torch.Tensor):
    zero = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    spec = view_spec(
        "simclr_cifar",
        size=x.shape[-1],
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        **{**PLAIN, **zero, op: strength, "jitter_p": 1.0},
    )
    v, p = _views(x, spec, V=1, return_params=True)
    return v[0], p


def test_jitter_ops_against_torchvision():
    x = torch.randint(30, 220, (64, 3, 8, 8), dtype=torch.uint8, generator=G)
    xf = x.float() / 255
    v, p = _single_op("brightness", 0.5, x)
    ref = torch.stack([TF.adjust_brightness(xf[i], p.brightness[0, i].item()) for i in range(64)])
    assert torch.allclose(v, ref, atol=1e-5)
    v, p = _single_op("contrast", 0.5, x)
    ref = torch.stack([TF.adjust_contrast(xf[i], p.contrast[0, i].item()) for i in range(64)])
    assert torch.allclose(v, ref, atol=5e-4)  # torchvision's tensor luma uses 0.2989 for red, ours PIL's 0.299
    v, p = _single_op("saturation", 0.5, x)
    ref = torch.stack([TF.adjust_saturation(xf[i], p.saturation[0, i].item()) for i in range(64)])
    assert torch.allclose(v, ref, atol=5e-4)


def test_hue_rotation_keeps_luma_and_follows_hsv_direction():
    x = torch.randint(60, 190, (64, 3, 8, 8), dtype=torch.uint8, generator=G)
    xf = x.float() / 255
    v, p = _single_op("hue", 0.05, x)  # small shifts: no clamping
    luma = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
    assert torch.allclose((v * luma).sum(1), (xf * luma).sum(1), atol=1e-4)
    ref = torch.stack([TF.adjust_hue(xf[i], p.hue[0, i].item()) for i in range(64)])  # HSV shift
    d_ours, d_ref = (v - xf).flatten(1), (ref - xf).flatten(1)
    cos = torch.nn.functional.cosine_similarity(d_ours, d_ref, dim=1)
    assert cos.mean() > 0.5 and (cos > 0).float().mean() > 0.95  # same direction as torchvision's HSV shift


def test_jitter_probability_and_identity():
    x = torch.randint(0, 256, (200, 3, 8, 8), dtype=torch.uint8, generator=G)
    spec = view_spec("simclr_cifar", size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **{**PLAIN, "jitter_p": 0.5})
    v, p = _views(x, spec, V=1, return_params=True)
    same = (v[0] - x.float() / 255).abs().amax((1, 2, 3)) < 1e-5
    assert torch.equal(same, ~p.jitter[0])


def test_blur_matches_kornia():
    x = torch.rand(4, 3, 32, 32, generator=G)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    ours = views._gaussian_blur(x, sigma, 5)
    ref = torch.cat(
        [
            kornia.filters.gaussian_blur2d(x[i : i + 1], (5, 5), (s, s), border_type="reflect")
            for i, s in enumerate(sigma.tolist())
        ]
    )
    assert torch.allclose(ours, ref, atol=1e-5)
    spec = view_spec("simclr", size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **{**PLAIN, "blur_p": 0.5})
    img = (torch.rand(100, 3, 32, 32, generator=G) * 255).to(torch.uint8)
    v, p = _views(img, spec, V=1, return_params=True)
    plain = img.float() / 255
    unchanged = (v[0] - plain).abs().amax((1, 2, 3)) < 1e-5
    assert torch.equal(unchanged, ~p.blur[0] | (p.sigma[0] < 0.2))  # sigma < 0.2 px barely moves a pixel
    tv = (v[0, ..., 1:] - v[0, ..., :-1]).abs().mean((1, 2, 3))
    tv0 = (plain[..., 1:] - plain[..., :-1]).abs().mean((1, 2, 3))
    strong = p.blur[0] & (p.sigma[0] > 0.6)
    assert strong.sum() > 20 and (tv[strong] < 0.8 * tv0[strong]).all()


def test_cutout_erases_the_drawn_box():
    spec = view_spec("simclr_cifar", size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **PLAIN, cutout_p=1.0)
    x = torch.full((500, 3, 32, 32), 200, dtype=torch.uint8)
    v, p = _views(x, spec, V=1, return_params=True)
    erased = (v[0] == 0).all(1).float().mean((1, 2))  # fraction of pixels erased
    cb = p.cutout_boxes[0]
    assert torch.allclose(erased, cb[:, 2] * cb[:, 3] / 1024, atol=0.08)
    assert erased.min() >= 0.0 and erased.max() <= 0.4 and erased.mean() > 0.05


def test_channel_conversion():
    gray = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8, generator=G)
    v = _views(gray, view_spec("simclr_cifar", **PLAIN, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)), V=1)
    assert v.shape[2] == 3 and torch.equal(v[0, :, 0], v[0, :, 1])
    rgb = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8, generator=G)
    assert _views(rgb, view_spec("simclr_small"), V=2).shape == (2, 2, 1, 28, 28)
    with pytest.raises(ValueError, match="channels"):
        _views(torch.zeros(1, 4, 8, 8, dtype=torch.uint8), view_spec("simclr_cifar"))


def test_eval_images_resize_and_center_crop():
    x = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8, generator=G)
    spec = view_spec("simclr", size=64)
    e = eval_images(x, spec)
    ref = TF.center_crop(TF.resize(x.float() / 255, [73], antialias=True), [64, 64])  # 64 / 0.875 = 73
    mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]
    assert e.shape == (2, 3, 64, 64) and torch.allclose(e, (ref.clamp(0, 1) - mean) / std, atol=1e-5)
    assert torch.equal(eval_images(x, spec), e)


# --------------------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("preset", list(PRESETS))
def test_views_independent_of_batch_composition(preset):
    spec = view_spec(preset, ["add_rotation", "add_cutout"])
    if preset == "simclr":
        spec = replace(spec, size=48)
    x = IMAGES[preset].repeat(7, 1, 1, 1)[:20]
    idx = torch.arange(100, 120)
    full = _views(x, spec, V=3, seed=7, epoch=2, idx=idx)
    perm = torch.randperm(20, generator=G)
    shuffled = _views(x[perm], spec, V=3, seed=7, epoch=2, idx=idx[perm], chunk=7)
    assert torch.allclose(shuffled, full[:, perm], atol=1e-6)
    small = torch.cat(
        [_views(x[i : i + 3], spec, V=3, seed=7, epoch=2, idx=idx[i : i + 3]) for i in range(0, 20, 3)], 1
    )
    assert torch.allclose(small, full, atol=1e-6)
    assert not torch.allclose(_views(x, spec, V=3, seed=7, epoch=3, idx=idx), full)  # epoch matters
    assert not torch.allclose(_views(x, spec, V=3, seed=8, epoch=2, idx=idx), full)  # seed matters
    assert not torch.allclose(full[0], full[1])  # views differ


def test_bad_make_views_arguments():
    x = IMAGES["simclr_cifar"]
    spec = view_spec("simclr_cifar")
    with pytest.raises(ValueError, match="one dataset index per image"):
        make_views(x, spec, num_views=2, seed=0, epoch=0, indices=torch.arange(3))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        make_views(x[0], spec, num_views=2, seed=0, epoch=0, indices=torch.arange(3))
    with pytest.raises(ValueError, match="pre-cropped"):
        make_views(
            torch.zeros(3, 6, 3, 32, 32, dtype=torch.uint8), spec, num_views=2, seed=0, epoch=0, indices=torch.arange(6)
        )


# --------------------------------------------------------------------------------------------------------
# large images: crops in DataLoader workers


def _folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / c).mkdir(parents=True)
        for i in range(5):
            arr = rng.integers(0, 256, (60 + 7 * i, 80, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / c / f"{i}.png")
    return tmp_path


def test_crop_views_match_the_batched_boxes(tmp_path):
    ds = load_dataset("image_folder", root=_folder(tmp_path), in_memory=False, use_cache=False)
    spec = view_spec("simclr", size=32)
    cv = CropViews(ds, spec, num_views=2, seed=3, epoch=1)
    i, crops = cv[4]
    assert i == 4 and crops.shape == (2, 3, 32, 32) and crops.dtype == torch.uint8
    img = ds.load_image(4)
    p = sample_params(
        spec, height=img.shape[1], width=img.shape[2], num_views=2, seed=3, epoch=1, indices=torch.tensor([4])
    )
    for v in range(2):
        x0, y0, w, h = p.boxes[v, 0].tolist()
        ref = TF.resized_crop(img, round(y0), round(x0), round(h), round(w), [32, 32], antialias=True)
        assert (crops[v].int() - ref.int()).abs().max() <= 1


def test_crop_views_same_with_workers_and_then_batched(tmp_path):
    ds = load_dataset("image_folder", root=_folder(tmp_path), in_memory=False, use_cache=False)
    spec = view_spec("simclr", size=32)
    out = {}
    for workers, bs in [(0, 10), (2, 3)]:
        loader = torch.utils.data.DataLoader(
            CropViews(ds, spec, num_views=2, seed=0, epoch=0), batch_size=bs, num_workers=workers
        )
        idx, crops = zip(*[(i, c) for i, c in loader], strict=True)
        idx, crops = torch.cat(idx), torch.cat(crops)  # (N,), (N, V, C, s, s)
        out[workers] = _views(crops.transpose(0, 1), spec, V=2, idx=idx)
    assert out[0].shape == (2, 10, 3, 32, 32) and torch.equal(out[0], out[2])


def test_pre_cropped_path_equals_batched_crop_on_whole_image_boxes():
    spec = view_spec("simclr_cifar", crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    x = IMAGES["simclr_cifar"]
    full = _views(x, spec, V=2)
    pre = _views(x[None].expand(2, -1, -1, -1, -1), spec, V=2)
    assert torch.allclose(full, pre, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# CLI


def test_cli_writes_a_grid(tmp_path, capsys):
    ds_root = _folder(tmp_path / "imgs")
    out = tmp_path / "grid.png"
    rc = views.cli_main(
        [
            "--dataset",
            "image_folder",
            "--root",
            str(ds_root),
            "--preset",
            "simclr",
            "--set",
            "size=32",
            "--modifier",
            "add_cutout",
            "--num-images",
            "3",
            "--num-views",
            "4",
            "--cell",
            "40",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and "wrote" in capsys.readouterr().out
    w, h = Image.open(out).size
    assert (w, h) == (5 * 42 + 2, 3 * 42 + 2)  # (1 original + 4 views) x 3 images, 2 px padding


def test_cli_in_memory_dataset(tmp_path):
    imgs = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=G)
    for i in range(8):
        (tmp_path / "d" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(imgs[i].permute(1, 2, 0).numpy()).save(tmp_path / "d" / f"c{i % 2}" / f"{i}.png")
    rc = views.cli_main(
        [
            "--dataset",
            "image_folder",
            "--root",
            str(tmp_path / "d"),
            "--out",
            str(tmp_path / "g.png"),
            "--num-images",
            "2",
            "--num-views",
            "2",
            "--cell",
            "32",
        ]
    )
    assert rc == 0 and Image.open(tmp_path / "g.png").size == (3 * 34 + 2, 2 * 34 + 2)


def test_cli_bad_input_is_one_message(tmp_path, capsys):
    from protoclr.cli import main

    rc = main(["views", "--dataset", "image_folder", "--root", str(tmp_path / "missing"), "--out", "x.png"])
    err = capsys.readouterr().err
    assert rc == 2 and "not found" in err and "Traceback" not in err
    rc = main(["views", "--dataset", "image_folder", "--root", str(tmp_path), "--modifier", "no_flip"])
    assert rc == 2 and "unknown view modifier" in capsys.readouterr().err


def test_labeled_images_in_views_pipeline():
    ds = LabeledImages(labels=torch.arange(4), classes=list("abcd"), images=IMAGES["simclr_cifar"][:4])
    idx = torch.tensor([2, 0])
    v = make_views(ds.get_images(idx), view_spec("simclr_cifar"), num_views=2, seed=0, epoch=0, indices=idx)
    assert v.shape == (2, 2, 3, 32, 32)


def test_protoclr_command_dispatches_to_views(tmp_path, capsys):
    from protoclr.cli import main

    rc = main(
        ["views", "--dataset", "image_folder", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "g.png")]
    )
    assert rc == 2 and "image folder not found" in capsys.readouterr().err


def test_float_input_equals_uint8_input():
    x = IMAGES["simclr_cifar"]
    spec = view_spec("simclr_cifar", ["add_cutout"])
    assert torch.allclose(_views(x.float() / 255, spec), _views(x, spec), atol=1e-6)


def test_views_numbered_from_first_view_are_the_same_as_in_one_larger_call():
    """Multi-crop's local views are views V.. of the image: a second call with first_view=V draws exactly the
    parameters that views V.. of one call would have drawn, and none of the first call's."""
    spec = view_spec("simclr_cifar")
    imgs, idx = IMAGES["simclr_cifar"][:6], torch.tensor([5, 9, 11, 2, 7, 3])
    four = make_views(imgs, spec, num_views=4, seed=3, epoch=2, indices=idx)
    first = make_views(imgs, spec, num_views=2, seed=3, epoch=2, indices=idx)
    rest = make_views(imgs, spec, num_views=2, seed=3, epoch=2, indices=idx, first_view=2)
    torch.testing.assert_close(torch.cat([first, rest]), four, rtol=0, atol=0)
    assert not torch.allclose(first, rest)


def test_train_views_from_a_config_local_views_and_progressive_sizes():
    from protoclr.config import load_config
    from protoclr.views import train_views

    cfg = load_config(None, ["data.views=simclr_cifar", "data.local_views=3", "data.local_size=12",
                             "data.local_crop_scale=0.1,0.3", "data.view_sizes=16,24,32",
                             'data.view_overrides=["crop_scale=[0.3, 1]", "brightness=0.1"]'])
    tv = train_views(cfg.data)
    assert tv.spec.crop_scale == (0.3, 1.0) and tv.spec.brightness == 0.1 and tv.spec.size == 32
    assert tv.local.size == 12 and tv.local.crop_scale == (0.1, 0.3) and tv.local.brightness == 0.1
    assert [tv.spec_at(s, 9).size for s in range(9)] == [16, 16, 16, 24, 24, 24, 32, 32, 32]
    imgs, idx = IMAGES["simclr_cifar"][:5], torch.arange(5)
    g, loc = tv.make(imgs, seed=0, epoch=0, indices=idx, step=4, total_steps=9)
    assert g.shape == (2 * 5, 3, 24, 24) and loc.shape == (3 * 5, 3, 12, 12)
    torch.testing.assert_close(loc, make_views(imgs, tv.local, num_views=3, seed=0, epoch=0, indices=idx,
                                               first_view=2).flatten(0, 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"data\.view_overrides: unknown ViewSpec field 'crop'"):
        load_config(None, ["data.view_overrides=[crop=1]"])
    with pytest.raises(ValueError, match=r"data\.views: unknown view preset 'simclr_tiny'"):
        load_config(None, ["data.views=simclr_tiny"])


def _framed_folder(tmp_path: Path) -> Path:
    """Wide images (40 x 120) with red left and right bands 12 px wide and a gray middle, two classes, in files of
    differing sizes (so the dataset is file-backed)."""
    for c in ("a", "b"):
        (tmp_path / c).mkdir(parents=True)
        for i in range(3):
            arr = np.full((40, 120 + 2 * i, 3), 128, np.uint8)
            arr[:, :12] = arr[:, -12:] = (255, 0, 0)
            Image.fromarray(arr).save(tmp_path / c / f"{i}.png")
    return tmp_path


def test_training_crops_reach_the_image_borders(tmp_path):
    """Crops of the whole image (scale 1, the image's own aspect ratio) keep its red borders; the old path, the
    256-pixel center crop of the shorter side, cut them away."""
    from protoclr.views import crop_views

    ds = load_dataset("image_folder", root=_framed_folder(tmp_path), use_cache=False)
    assert not ds.in_memory
    spec = view_spec("simclr", size=16, crop_scale=(1.0, 1.0), crop_ratio=(3.0, 3.1))
    crops = crop_views(ds, [0, 3], spec, num_views=2, seed=0, epoch=0)  # (V, B, C, s, s)
    assert crops.shape == (2, 2, 3, 16, 16)
    for edge in (crops[..., 0], crops[..., -1]):  # (V, B, C, s): the first and last columns
        assert bool((edge[:, :, 0] > 200).all() and (edge[:, :, 1] < 60).all())  # red
    assert bool((crops[..., 8][:, :, 1] > 100).all())  # the gray middle
    center = ds.get_images(torch.tensor([0]))  # shorter side to 256, center crop: the bands are gone
    assert not bool((center[0, 0, :, 0] > 200).any() and (center[0, 1, :, 0] < 60).any())


def test_file_backed_training_uses_whole_image_crops(tmp_path, monkeypatch):
    """The loop crops a file-backed dataset's views from the full images (crop_views, via EpochBatches) and refuses
    local views there with a message naming the keys."""
    import protoclr.splits as S
    from protoclr.config import ConfigError, load_config
    from protoclr.train import pretrain

    root = _framed_folder(tmp_path / "data")
    seen = []
    real = S.crop_views

    def spy(dataset, indices, spec, **kw):
        seen.append((len(indices), spec.size, kw["num_views"]))
        return real(dataset, indices, spec, **kw)

    monkeypatch.setattr(S, "crop_views", spy)
    base = ["data.dataset=image_folder", f"data.root={root}", "data.test_split=train", "data.views=simclr_cifar",
            "train.batch_size=3", "train.steps=2", "eval.every=0", "trainer.progress=false", "trainer.loggers=[]",
            "model.convnet_widths=8,16", "model.projector_hidden_dim=16", "model.projector_dim=8",
            f"train.out_dir={tmp_path / 'runs'}", "trainer.precision=32-true"]
    pretrain(load_config(None, base))
    assert seen == [(3, 32, 2), (3, 32, 2)]
    with pytest.raises(ConfigError, match=r"data\.local_views / data\.view_sizes need an in-memory dataset"):
        pretrain(load_config(None, [*base, "data.local_views=2", "train.run_name=local"]))


def test_simclr_rotation_draws_each_quarter_turn_equally_and_rotates_exactly():
    """add_rotation_90: angles 0, 90, 180, 270 (as -90 .. 180) with probability 1/4 each; a 90-degree view of a
    full-image crop is the image turned by a quarter (torch.rot90), up to interpolation at the border."""
    spec = view_spec("simclr_cifar", ["add_rotation_90"])
    p = sample_params(spec, height=32, width=32, num_views=4, seed=0, epoch=0, indices=torch.arange(2000))
    angles, counts = torch.unique(p.angle.abs().where(p.angle.abs() != 180, torch.tensor(180.0)), return_counts=True)
    assert angles.tolist() == [0.0, 90.0, 180.0] and counts.sum().item() == 8000
    share = {a: c / 8000 for a, c in zip(angles.tolist(), counts.tolist(), strict=True)}
    assert abs(share[0.0] - 0.25) < 0.02 and abs(share[180.0] - 0.25) < 0.02 and abs(share[90.0] - 0.5) < 0.02
    x = torch.rand(1, 3, 16, 16)
    flat = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    plain = view_spec("simclr_cifar", ["add_rotation_90"], size=16, **flat)
    out, params = make_views(x, plain, num_views=8, seed=1, epoch=0, indices=torch.tensor([0]), return_params=True)
    ref = eval_images(x, plain)[0]
    for v in range(8):
        k = round(float(params.angle[v, 0]) / 90) % 4  # counter-clockwise quarter turns
        torch.testing.assert_close(out[v, 0][:, 1:-1, 1:-1], torch.rot90(ref, k, dims=(1, 2))[:, 1:-1, 1:-1],
                                   atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# the data decides the views


def _data_cfg(**kw):
    from protoclr.config import DataConfig

    return replace(DataConfig(), **kw)


@pytest.mark.parametrize(("channels", "side", "preset", "size"), [
    (1, 28, "simclr_small", 28),  # Fashion-MNIST: the default fits, nothing changes
    (3, 32, "simclr_cifar", 32),  # CIFAR-like: the RGB preset at its own size
    (3, 40, "simclr_cifar", 40),  # RGB 40 px photos: RGB views at the images' side
    (1, 64, "simclr_small", 64),
    (3, 500, "simclr", 224),      # photographs: SimCLR's ImageNet recipe
])
def test_an_unchosen_preset_follows_the_images(channels, side, preset, size):
    d = _data_cfg()
    name, overrides, msg = views.fit_views(d, channels=channels, side=side, what="photos", chosen=False)
    fitted = views.config_view_spec(_data_cfg(views=name, view_overrides=overrides))
    assert (name, fitted.size, fitted.channels) == (preset, size, channels)
    if (channels, side) == (1, 28):
        assert msg is None and overrides == []
    else:  # one line saying what was chosen and which key chooses otherwise
        assert "\n" not in msg and "photos" in msg and preset in msg and f"{size} px" in msg and "data.views" in msg


def test_a_chosen_grey_preset_on_rgb_images_is_refused_naming_data_views():
    from protoclr.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^data\.views=simclr_small makes grey 28-pixel views but photos holds RGB"):
        views.fit_views(_data_cfg(), channels=3, side=40, what="photos", chosen=True)
    # a chosen RGB preset on grey images is kept (grey is repeated into RGB, nothing is lost)
    name, _, msg = views.fit_views(_data_cfg(views="simclr_cifar"), channels=1, side=28, what="fm", chosen=True)
    assert (name, msg) == ("simclr_cifar", None)


def test_image_shape_reads_grey_folders_as_one_channel():
    from protoclr.data import image_shape

    rgb = torch.randint(0, 255, (5, 3, 40, 36), dtype=torch.uint8)
    grey = rgb[:, :1].expand(-1, 3, -1, -1).contiguous()  # what an image folder of grey files decodes to
    assert image_shape(LabeledImages(labels=torch.zeros(5), classes=["a"], images=rgb)) == (3, 36)
    assert image_shape(LabeledImages(labels=torch.zeros(5), classes=["a"], images=grey)) == (1, 36)
