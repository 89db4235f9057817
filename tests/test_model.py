"""The loss and the anomaly map against hand-computed tiny examples."""

import numpy as np
import pytest
import torch

from stfpm_edge.model import (
    STFPM,
    anomaly_map,
    feature_distance,
    image_score,
    stfpm_loss,
)


def _feat(values):
    # one image, channels given, 1x1 spatial
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def test_feature_distance_by_hand():
    # t = (3, 4) -> (0.6, 0.8); s = (1, 0) -> (1, 0); diff (-0.4, 0.8); 0.5 * (0.16 + 0.64) = 0.4
    d = feature_distance(_feat([3, 4]), _feat([1, 0]))
    assert d.shape == (1, 1, 1, 1)
    assert d.item() == pytest.approx(0.4, abs=1e-7)
    # scale invariance of the normalisation; identical directions give zero
    assert feature_distance(_feat([3, 4]), _feat([30, 40])).item() == pytest.approx(0.0, abs=1e-7)
    # opposite unit vectors: 0.5 * |2|^2 = 2
    assert feature_distance(_feat([1, 0]), _feat([-5, 0])).item() == pytest.approx(2.0, abs=1e-6)


def test_loss_is_mean_over_positions_and_batch_summed_over_levels():
    # level 1: batch of two 1x2 maps with distances {0.4, 0} and {2, 0}: mean 0.6
    t1 = torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]], [[[1.0, 1.0]], [[0.0, 0.0]]]])  # [2, 2, 1, 2]
    s1 = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]]], [[[-1.0, 3.0]], [[0.0, 0.0]]]])
    # level 2: distance 0.4 everywhere
    t2 = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1).expand(2, 2, 1, 1)
    s2 = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(2, 2, 1, 1)
    loss = stfpm_loss([t1, t2], [s1, s2])
    assert loss.item() == pytest.approx(0.6 + 0.4, abs=1e-6)
    # independent of batch size: duplicating the batch changes nothing
    loss2 = stfpm_loss([torch.cat([t1, t1]), torch.cat([t2, t2])], [torch.cat([s1, s1]), torch.cat([s2, s2])])
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)


def test_anomaly_map_upsamples_bilinearly_and_multiplies_levels():
    # level 1: 1x2 distances (a, b) = (0.4, 2.0); bilinear, align_corners=False, to width 4:
    # [a, 0.75a + 0.25b, 0.25a + 0.75b, b]
    t1 = torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]])
    s1 = torch.tensor([[[[1.0, -1.0]], [[0.0, 0.0]]]])
    # level 2: constant 0.4 at 1x1
    t2, s2 = _feat([3, 4]), _feat([1, 0])
    amap = anomaly_map([t1, t2], [s1, s2], (1, 4))
    a, b = 0.4, 2.0
    expected = np.array([a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b]) * 0.4
    np.testing.assert_allclose(amap.numpy().ravel(), expected, rtol=1e-6)
    assert image_score(amap).item() == pytest.approx(expected.max(), rel=1e-6)
    # level weights are exponents in the product: d1 ** 0.5 * d2 ** 2; a weight of 0 leaves the level out
    halves = anomaly_map([t1, t2], [s1, s2], (1, 4), weights=(0.5, 2.0))
    np.testing.assert_allclose(halves.numpy().ravel(), np.sqrt(expected / 0.4) * 0.4**2, rtol=1e-6)
    deep = anomaly_map([t1, t2], [s1, s2], (1, 4), weights=(0.0, 1.0))
    np.testing.assert_allclose(deep.numpy().ravel(), [0.4] * 4, rtol=1e-6)


def test_level_weights_are_checked_against_the_models_levels():
    from stfpm_edge.errors import StfpmError
    from stfpm_edge.model import MapPost

    assert MapPost(level_weights=[0, 1]).level_weights == (0.0, 1.0)  # a checkpoint's JSON list
    assert MapPost(level_weights=[0, 1]).to_dict()["level_weights"] == [0.0, 1.0]
    for bad in ((0.0, 0.0), (-1.0, 1.0)):
        with pytest.raises(StfpmError, match="level weights"):
            MapPost(level_weights=bad)
    model = STFPM.build("tf_efficientnet_lite0", pretrained=False, layers=(1, 2))
    with pytest.raises(StfpmError, match="3 level weights .* 2 feature levels"):
        model.set_post(MapPost(level_weights=(1, 1, 1)))
    model.set_post(MapPost(level_weights=(0, 1)))
    frames = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        amap, _ = model.eval()(frames)
        t, s = model.features(model.normalize(frames))
    # the deepest level alone, upsampled
    np.testing.assert_allclose(amap.numpy(), anomaly_map(t[1:], s[1:], (64, 64)).numpy(), rtol=1e-5)


def test_normalize_converts_bgr_uint8_to_normalised_rgb():
    from stfpm_edge.backbones import create_features

    model = STFPM("tf_efficientnet_lite0", create_features("tf_efficientnet_lite0"), create_features("tf_efficientnet_lite0"))
    frame = np.zeros((1, 32, 32, 3), np.uint8)
    frame[..., 0] = 255  # blue in BGR
    x = model.normalize(torch.from_numpy(frame))
    assert x.shape == (1, 3, 32, 32)
    # mean = std = 0.5: blue=1.0 -> +1, red/green=0 -> -1; RGB order puts blue last
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [-1.0, -1.0, 1.0], atol=1e-6)


def test_teacher_stays_frozen_in_train_mode():
    from stfpm_edge.backbones import create_features

    model = STFPM("tf_efficientnet_lite0", create_features("tf_efficientnet_lite0"), create_features("tf_efficientnet_lite0"))
    model.train()
    assert model.student.training and not model.teacher.training


def test_blurred_map_keeps_a_flat_map_flat_and_spreads_a_peak():
    from stfpm_edge.model import blur_map, gaussian_kernel

    k = gaussian_kernel(2.0)
    flat = torch.full((1, 1, 20, 30), 0.7)
    torch.testing.assert_close(blur_map(flat, k), flat)  # borders normalised: no dark rim
    peak = torch.zeros(1, 1, 41, 41)
    peak[0, 0, 20, 20] = 1.0
    out = blur_map(peak, k)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5) and out.max().item() < 0.05
    assert out[0, 0, 20, 20] == out.max()


def test_topk_score_is_the_mean_of_the_largest_pixels():
    from stfpm_edge.model import MapPost, image_score

    amap = torch.zeros(2, 1, 10, 10)
    amap[0, 0, 0, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert image_score(amap).tolist() == [4.0, 0.0]
    assert image_score(amap, topk=2).tolist() == [3.5, 0.0]
    assert MapPost(topk_fraction=0.02).topk(10, 10) == 2 and MapPost().topk(10, 10) == 1
    assert MapPost(topk_fraction=0.5).topk(512, 512) == 3840  # TensorRT's TopK limit
    with pytest.raises(Exception, match="top-k"):
        MapPost(topk_fraction=1.5)


def test_memory_bank_distance_is_the_student_distance_to_the_nearest_good_feature():
    from stfpm_edge.model import MemoryBank

    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(9000, 5, generator=g), dim=1)  # more rows than one chunk
    t = torch.randn(2, 5, 3, 4, generator=g)
    (d,) = MemoryBank([bank]).distances([t])
    # by hand: feature_distance to every row, the smallest per position
    rows = t.permute(0, 2, 3, 1).reshape(-1, 1, 5, 1, 1)
    brute = torch.stack([feature_distance(r, bank.view(-1, 5, 1, 1)).min() for r in rows]).view(2, 1, 3, 4)
    assert d.shape == (2, 1, 3, 4) and torch.allclose(d, brute, atol=1e-5)
    # a position equal to a bank row (up to scale) is at distance 0
    (d0,) = MemoryBank([bank]).distances([(3.0 * bank[1234]).view(1, 5, 1, 1)])
    assert d0.item() == pytest.approx(0.0, abs=1e-6)


def test_greedy_coreset_covers_every_cluster():
    from stfpm_edge.model import greedy_coreset

    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4)
    x = torch.nn.functional.normalize(centres.repeat_interleave(250, 0) + 0.01 * torch.randn(1000, 4, generator=g), dim=1)
    x = torch.cat([x[:997], x[-3:]])  # a rare cluster of 3 rows among 997 others still gets a row
    picked = greedy_coreset(x, 4, g)
    assert sorted(int(i) // 250 for i in picked) == [0, 1, 2, 3]
    assert len(greedy_coreset(x, 5000, g)) == 1000  # asking for more rows than there are keeps them all


def test_the_lazy_selection_chooses_the_rows_the_plain_greedy_chooses():
    """The CPU's lazy k-centre (blocks brought up to date only when they could hold the farthest row) against the plain
    loop written out here: the same rows in the same order, on clustered data with several blocks, and per level."""
    from stfpm_edge.model import CORESET_BLOCK, _lazy_greedy, coreset_levels

    g = torch.Generator().manual_seed(3)
    centres = torch.randn(40, 8, generator=g)
    x = torch.nn.functional.normalize(centres.repeat_interleave(100, 0) + 0.3 * torch.randn(4000, 8, generator=g), dim=1)
    assert len(x) > 4 * CORESET_BLOCK
    chosen, nearest = [17], (2 - 2 * (x @ x[17])).double()
    for _ in range(299):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, (2 - 2 * (x @ x[chosen[-1]])).double())
    assert _lazy_greedy(x.numpy(), 300, 17).tolist() == chosen
    levels = coreset_levels([x, x[:1000], x[:50]], [300, 100, 80], torch.Generator().manual_seed(0))
    assert [len(c) for c in levels] == [300, 100, 50] and len(set(levels[0].tolist())) == 300


def test_hard_feature_loss_keeps_only_the_largest_distances_per_level():
    # one level, four positions with distances 0.4, 0, 2, 0 (as above): the top half is {2, 0.4}
    t = torch.tensor([[[[3.0, 1.0, 1.0, 1.0]], [[4.0, 0.0, 0.0, 0.0]]]])
    s = torch.tensor([[[[1.0, 2.0, -1.0, 5.0]], [[0.0, 0.0, 0.0, 0.0]]]])
    assert stfpm_loss([t], [s]).item() == pytest.approx(0.6, abs=1e-6)  # the paper's: all four
    assert stfpm_loss([t], [s], hard_fraction=0.5).item() == pytest.approx(1.2, abs=1e-6)
    assert stfpm_loss([t], [s], hard_fraction=0.01).item() == pytest.approx(2.0, abs=1e-6)  # at least one position


def test_a_standardised_teacher_makes_the_map_the_mean_squared_difference():
    from stfpm_edge.backbones import create_features
    from stfpm_edge.model import STFPM, FeatureNorm, squared_distance

    t = torch.tensor([[[[3.0]], [[4.0]]]])  # one position, two channels
    s = torch.tensor([[[[1.0]], [[0.0]]]])
    assert squared_distance(t, s).item() == pytest.approx((4.0 + 16.0) / 2)
    assert squared_distance(t, 10 * t).item() == pytest.approx(81 * 25 / 2)  # unlike the cosine, scale counts
    torch.manual_seed(0)
    teacher = create_features("tf_efficientnet_lite0").eval()
    chans = list(teacher.feature_info.channels())
    norm = FeatureNorm(teacher, [torch.randn(c) for c in chans], [torch.rand(c) + 0.5 for c in chans])
    pair = STFPM("tf_efficientnet_lite0", norm, create_features("tf_efficientnet_lite0")).eval()
    assert pair.metric == ("l2",) * 3 and STFPM("tf_efficientnet_lite0", teacher, pair.student).metric == ("cosine",) * 3
    frames = torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        amap, _ = pair(frames)
        x = pair.normalize(frames)
        raw = teacher(x)
        t_std = [(f - getattr(norm, f"mean{k}")) * getattr(norm, f"inv_std{k}") for k, f in enumerate(raw)]
        by_hand = anomaly_map(t_std, pair.student(x), (64, 64), "l2")
    assert torch.allclose(amap, by_hand, rtol=1e-5, atol=1e-6)


def test_a_teacher_standardised_at_its_deepest_level_only_keeps_the_cosine_at_the_finer_ones():
    from stfpm_edge.backbones import create_features
    from stfpm_edge.errors import StfpmError
    from stfpm_edge.model import STANDARDISED_LEVELS, STFPM, FeatureNorm, feature_distance, squared_distance

    torch.manual_seed(0)
    teacher = create_features("tf_efficientnet_lite0").eval()
    chans = list(teacher.feature_info.channels())
    means, stds = [torch.randn(c) for c in chans], [torch.rand(c) + 0.5 for c in chans]
    norm = FeatureNorm(teacher, means, stds, STANDARDISED_LEVELS["deep"])
    assert norm.metrics == ("cosine", "cosine", "l2") and sorted(dict(norm.named_buffers(recurse=False))) == ["inv_std2", "mean2"]
    pair = STFPM("tf_efficientnet_lite0", norm, create_features("tf_efficientnet_lite0")).eval()
    assert pair.metric == ("cosine", "cosine", "l2")
    frames = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        amap, _ = pair(frames)
        x = pair.normalize(frames)
        raw, s = teacher(x), pair.student(x)
        t = norm(x)
        assert torch.equal(t[0], raw[0]) and torch.equal(t[1], raw[1])
        assert torch.allclose(t[2], (raw[2] - means[2].view(1, -1, 1, 1)) / stds[2].view(1, -1, 1, 1), rtol=1e-5, atol=1e-5)
        up = [torch.nn.functional.interpolate(d, size=(64, 64), mode="bilinear", align_corners=False)
              for d in (feature_distance(raw[0], s[0]), feature_distance(raw[1], s[1]), squared_distance(t[2], s[2]))]
        by_hand = up[0] * up[1] * up[2]
        loss = stfpm_loss(t, s, metric=pair.metric)
    assert torch.allclose(amap, by_hand, rtol=1e-5, atol=1e-7)
    assert loss.item() == pytest.approx(sum(float(d.mean()) for d in (feature_distance(raw[0], s[0]), feature_distance(raw[1], s[1]),
                                                                      squared_distance(t[2], s[2]))), rel=1e-5)
    with pytest.raises(StfpmError, match="one of cosine, l2 per level"):
        anomaly_map(t, s, (64, 64), ("cosine", "l2"))
