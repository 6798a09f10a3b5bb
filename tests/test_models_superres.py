"""Super-resolution: degradation model, data consistency, geometry, residual property, shipped weights."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from models.degradation import DegradationError, DegradationModel, kspace_down, kspace_up
from models.superres import (
    CONSISTENCY_TOLERANCE,
    WEIGHTS_PATH,
    SuperResConfig,
    SuperResError,
    SuperResModel,
)
from models.superres.data import phantom_case
from models.superres.net import smooth_consistent_matrix
from models.superres.quality import evaluate_cases
from models.types import Volume

# evaluation seeds far from the training seeds (7_000_000 + i, see the model card)
FRESH_SEEDS = (9_100_001, 9_100_002, 9_100_003, 9_100_004, 9_100_005)


@pytest.fixture(scope="module")
def shipped() -> SuperResModel:
    torch.set_num_threads(2)
    return SuperResModel.load(WEIGHTS_PATH)


def _volume(array: np.ndarray, spacing=(3.5, 0.5, 0.5)) -> Volume:
    n = array.shape[0]
    row, col = (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)
    normal = np.cross(row, col)
    origin = np.array([-40.0, -60.0, 70.0])
    positions = np.stack([origin + k * spacing[0] * normal for k in range(n)])
    return Volume(
        array=array.astype(np.float32),
        spacing=spacing,
        positions=positions,
        row_cosine=row,
        col_cosine=col,
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        frame_of_reference_uid="1.2.3.5",
        sop_instance_uids=tuple(f"1.2.3.4.{k}" for k in range(n)),
        frame_numbers=(None,) * n,
        series_description="SAG PD FS",
    )


# --- degradation model -----------------------------------------------------------------


def test_slice_profile_rows_sum_to_one_and_cross_talk_is_small():
    s = DegradationModel().slice_matrix(6)
    assert s.shape == (6, 12)
    assert np.allclose(s.sum(axis=1), 1.0)
    assert (s >= 0).all()
    inner = s[2]  # slice 2 covers fine slices 4 and 5, with a little of 3 and 6
    assert inner[4] == pytest.approx(inner[5]) and inner[4] > 0.4
    assert 0.0 < inner[3] < 0.1 and inner[0] == 0.0


def test_kspace_truncation_is_exactly_undone_by_zero_fill_and_keeps_low_frequencies():
    rng = np.random.default_rng(0)
    for shape in [(2, 16, 12), (3, 9, 7)]:
        y = rng.random(shape).astype(np.float32)
        assert np.abs(kspace_down(kspace_up(y, 2), 2) - y).max() < 1e-5
    j = np.arange(32)
    x = (np.cos(2 * np.pi * 3 * j / 32)[:, None] * np.sin(2 * np.pi * 5 * j / 32)[None, :])[None]
    y = kspace_down(x, 2)
    assert np.abs(y[0] - x[0, ::2, ::2]).max() < 1e-5  # band-limited content survives unchanged
    assert np.abs(kspace_down(np.ones((1, 20, 20)), 2) - 1).max() < 1e-6


def test_degradation_shapes_noise_and_bad_input():
    rng = np.random.default_rng(1)
    x = rng.random((11, 16, 16)).astype(np.float32) + 1
    model = DegradationModel(inplane_factor=2, snr=20.0)
    y = model.degrade(x, rng)  # 11 slices: the odd one is dropped
    assert y.shape == (5, 8, 8)
    clean = dataclasses.replace(model, snr=None).degrade(x, rng)
    noise = float(np.std(y - clean))
    assert 0.5 * x.mean() / 20 < noise < 2.0 * x.mean() / 20
    with pytest.raises(DegradationError):
        model.apply(x)
    with pytest.raises(DegradationError):
        model.apply(x[0])


def test_projection_is_exactly_consistent_and_idempotent():
    rng = np.random.default_rng(2)
    model = DegradationModel(inplane_factor=2)
    y = rng.random((6, 10, 10)).astype(np.float32)
    x = rng.random((12, 20, 20)).astype(np.float32)
    p = model.project(x, y)
    assert model.consistency_error(p, y) < 1e-6
    assert np.abs(model.project(p, y) - p).max() < 1e-5
    assert model.consistency_error(model.tricubic(y), y) > 1e-2  # tricubic alone is not consistent


def test_interpolated_input_is_consistent_and_smooth():
    m = smooth_consistent_matrix(8, 2, 0.15)
    s = DegradationModel().slice_matrix(8)
    assert np.allclose(s @ m, np.eye(8), atol=1e-9)
    assert np.allclose(m @ np.full(8, 5.0), 5.0)  # constant data -> the same constant
    fine = m @ np.arange(8.0)  # linear data -> linear on the fine grid, away from the edge folding
    assert np.abs(np.diff(fine[4:-4], 2)).max() < 0.01
    assert np.allclose(fine[4:-4], np.arange(4, 12) / 2 - 0.25, atol=0.01)


# --- the model ---------------------------------------------------------------------------


def test_untrained_network_adds_no_detail_so_output_is_the_interpolated_input():
    model = SuperResModel.untrained(SuperResConfig())
    y = np.random.default_rng(3).random((7, 20, 22)).astype(np.float32) * 100
    with_detail, _ = model.enhance(y)
    interpolated, _ = model.enhance(y, detail=False)
    assert np.abs(with_detail - interpolated).max() < 1e-3
    assert DegradationModel().consistency_error(interpolated, y) < 1e-6


def test_residual_property_of_the_shipped_model(shipped):
    """Zeroing the learned detail gives back the interpolated input; the detail lives in the null space of A."""
    case = phantom_case("knee", FRESH_SEEDS[0])
    out, _ = shipped.enhance(case.lr)
    interpolated, _ = shipped.enhance(case.lr, detail=False)
    detail = out - interpolated
    assert np.abs(detail).max() > 0.01 * np.abs(interpolated).max()  # the network does add detail
    deg = shipped.config.degradation()
    assert np.abs(deg.apply(detail)).max() < 1e-3 * np.abs(case.lr).max()

    zeroed = SuperResModel(net=type(shipped.net)(shipped.config), config=shipped.config, info=shipped.info)
    zeroed.net.load_state_dict(shipped.net.state_dict())
    with torch.no_grad():
        zeroed.net.tail.conv.weight.zero_()
        zeroed.net.tail.conv.bias.zero_()
    zeroed.net.eval()
    assert np.abs(zeroed.enhance(case.lr)[0] - interpolated).max() < 1e-3 * np.abs(interpolated).max()


def test_predict_geometry_consistency_and_source_untouched(shipped):
    case = phantom_case("knee", FRESH_SEEDS[1])
    src = _volume(case.lr)
    before = src.array.copy()
    out = shipped.predict(src)
    vol = out.volume
    n = src.shape[0]
    assert vol.shape == (2 * n, src.shape[1], src.shape[2])
    assert vol.spacing == pytest.approx((1.75, 0.5, 0.5))
    steps = np.diff(vol.positions, axis=0)
    assert np.allclose(steps, 1.75 * src.normal)
    # the two thin slices split the thick one: centred +-1/4 thickness around it
    assert np.allclose(vol.positions[0], src.positions[0] - 0.875 * src.normal)
    assert np.allclose(vol.positions[-1], src.positions[-1] + 0.875 * src.normal)
    assert vol.frame_of_reference_uid == src.frame_of_reference_uid
    assert vol.series_uid == src.series_uid and vol.attributes["derived_from_series_uid"] == src.series_uid
    assert vol.sop_instance_uids == tuple(u for u in src.sop_instance_uids for _ in range(2))
    assert vol.row_cosine == src.row_cosine and vol.col_cosine == src.col_cosine
    assert out.qc.accepted and out.consistency_passed
    assert out.consistency_error <= out.consistency_tolerance == CONSISTENCY_TOLERANCE
    assert np.array_equal(src.array, before)  # the original series is never altered
    assert out.model.weights_sha256 == WEIGHTS_PATH.with_name(WEIGHTS_PATH.name + ".sha256").read_text().split()[0]
    # exact consistency with a noisy input can leave a small undershoot in the background noise
    p99 = np.percentile(src.array, 99)
    assert vol.array.min() > -0.1 * p99 and np.mean(vol.array < -0.02 * p99) < 0.005


def test_inplane_on_request(shipped):
    case = phantom_case("knee", FRESH_SEEDS[2])
    src = _volume(case.lr[:, :64, :60])
    out = shipped.predict(src, inplane=True)
    vol = out.volume
    assert vol.shape == (2 * src.shape[0], 128, 120)
    assert vol.spacing == pytest.approx((1.75, 0.25, 0.25))
    assert np.allclose(vol.positions[0], src.positions[0] - 0.875 * src.normal)  # in-plane: pixel 0 keeps its centre
    assert out.consistency_passed
    deg = DegradationModel(inplane_factor=2)
    assert deg.consistency_error(vol.array, src.array) == pytest.approx(out.consistency_error)


def test_qc_refuses_unusable_input(shipped):
    out = shipped.predict(_volume(np.ones((6, 32, 32))))
    assert not out.qc.accepted and out.qc.reason == "constant_image"
    assert not out.consistency_passed
    out = shipped.predict(_volume(np.random.default_rng(0).random((1, 32, 32))))
    assert out.qc.reason == "too_few_slices"


def test_corrupted_weights_are_refused(tmp_path):
    target = tmp_path / "model.pt"
    shutil.copy(WEIGHTS_PATH, target)
    shutil.copy(WEIGHTS_PATH.with_name(WEIGHTS_PATH.name + ".sha256"), tmp_path / "model.pt.sha256")
    assert SuperResModel.load(target).info.weights_sha256
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(SuperResError, match="sha256 mismatch"):
        SuperResModel.load(target)
    with pytest.raises(SuperResError, match="not found"):
        SuperResModel.load(tmp_path / "missing.pt")


def test_shipped_weights_beat_tricubic_on_fresh_phantoms(shipped):
    cases = [phantom_case("knee", s) for s in FRESH_SEEDS]
    result = evaluate_cases(shipped, cases, keep_cases=True)
    assert result["n"] == len(FRESH_SEEDS)
    assert result["consistency_passed"]
    assert result["psnr_gain_db"] > 0.5
    assert result["ssim_gain"] > 0
    assert all(c["psnr"] > c["psnr_tricubic"] for c in result["cases"])


def test_network_skips_empty_background_without_changing_the_signal_region(shipped):
    from models.superres.net import BOX_MARGIN, _Operators, forward_detail

    rng = np.random.default_rng(4)
    y = np.zeros((6, 96, 96), np.float32)
    y[:, 40:60, 30:50] = rng.random((6, 20, 20)) + 0.5  # signal in a small central block only
    yt = torch.from_numpy(y)
    ops = _Operators.build(6, shipped.config)
    with torch.inference_mode():
        base, full = forward_detail(shipped.net, yt, ops, shipped.config)
        _, skipped = forward_detail(shipped.net, yt, ops, shipped.config, chunk=4, skip_background=True)
    inner = (slice(None), slice(40 - 4, 60 + 4), slice(30 - 4, 50 + 4))
    assert torch.allclose(full[inner], skipped[inner], atol=1e-5)
    far = (slice(None), slice(0, 40 - BOX_MARGIN - 8), slice(None))
    assert torch.equal(skipped[far], base[far])  # no detail where there is no signal
    assert not torch.equal(full[far], base[far])  # (the network alone would have added some)


def test_bfloat16_switch(monkeypatch):
    from models.superres.inference import BF16_ENV, native_bf16, use_bf16

    for value, expected in (("1", True), ("on", True), ("0", False), ("off", False)):
        monkeypatch.setenv(BF16_ENV, value)
        assert use_bf16() is expected
        assert SuperResModel.load(WEIGHTS_PATH).bf16 is expected
    monkeypatch.setenv(BF16_ENV, "auto")
    assert use_bf16() is native_bf16()
    monkeypatch.setenv(BF16_ENV, "fast")
    with pytest.raises(SuperResError, match="expected 1, 0 or auto"):
        use_bf16()


def test_bfloat16_network_gives_the_float32_result_within_a_fraction_of_a_grey_level():
    """Only the network runs in bfloat16 (where the CPU computes it natively, the default there): the output
    stays consistent with the input and within 0.1 % (RMS) of the float32 output's peak; the phantom gain
    over tricubic is the same to 0.01 dB."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bfloat16 on this CPU")
    torch.set_num_threads(2)
    fp32 = SuperResModel.load(WEIGHTS_PATH)
    fp32.bf16 = False
    bf16 = SuperResModel.load(WEIGHTS_PATH)
    bf16.bf16 = True
    case = phantom_case("knee", FRESH_SEEDS[0])
    x, sa = fp32.enhance(case.lr)
    y, sb = bf16.enhance(case.lr)
    assert sb["detail_gain"] == pytest.approx(sa["detail_gain"], abs=0.02)
    deg = fp32.config.degradation()
    assert deg.consistency_error(y, case.lr) <= CONSISTENCY_TOLERANCE
    assert not np.array_equal(x, y)  # the network really ran in bfloat16
    psnr = 10 * np.log10(float(x.max()) ** 2 / float(np.mean((x - y) ** 2)))
    assert psnr > 60, psnr
    cases = [phantom_case("knee", s) for s in FRESH_SEEDS[:3]]
    ga = evaluate_cases(fp32, cases)["psnr_gain_db"]
    gb = evaluate_cases(bf16, cases)["psnr_gain_db"]
    assert gb == pytest.approx(ga, abs=0.01)
