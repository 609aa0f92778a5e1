import numpy as np
import pytest

from core.fusion import late_fuse, normalize, reciprocal_rank_fusion


def test_normalize_rows_and_zero_vector():
    m = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    out = normalize(m)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out[[0, 2]], axis=1), 1.0, rtol=1e-6)
    assert not np.any(out[1]), "a zero vector has no direction and must stay zero"


def test_late_fuse_is_weighted_sum_of_unit_vectors():
    rng = np.random.default_rng(0)
    image, findings = rng.normal(size=(2, 16)).astype(np.float32) * [[10.0], [0.1]]
    fused = late_fuse(image, findings, w_image=0.7, w_findings=0.3)
    expected = 0.7 * image / np.linalg.norm(image) + 0.3 * findings / np.linalg.norm(findings)
    np.testing.assert_allclose(fused, expected / np.linalg.norm(expected), rtol=1e-5)


def test_late_fuse_weights_set_the_shares_not_the_norms():
    image = np.array([100.0, 0.0], dtype=np.float32)
    findings = np.array([0.0, 0.01], dtype=np.float32)
    fused = late_fuse(image, findings, w_image=1, w_findings=1)
    assert fused[0] == pytest.approx(fused[1])


def test_late_fuse_batch_and_edge_weights():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(5, 8)).astype(np.float32)
    findings = rng.normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_allclose(
        late_fuse(images, findings, w_image=1, w_findings=0), normalize(images), rtol=1e-6
    )
    with pytest.raises(ValueError, match="weights"):
        late_fuse(images, findings, w_image=0, w_findings=0)
    with pytest.raises(ValueError, match="shape"):
        late_fuse(images, findings[:, :4], w_image=1, w_findings=1)


def test_rrf_scores_and_order():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a"]], k=60)
    scores = dict(fused)
    assert scores["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert scores["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert scores["b"] == pytest.approx(1 / 62)
    assert [key for key, _ in fused] == ["a", "c", "b"]


def test_rrf_one_leg_cannot_drown_the_other():
    # Raw scores play no part: the top of each leg lands at the same score.
    fused = dict(reciprocal_rank_fusion([["img1", "img2"], ["lab1", "lab2"]], k=60))
    assert fused["img1"] == fused["lab1"] > fused["img2"] == fused["lab2"]


def test_rrf_rejects_duplicates_and_bad_k():
    with pytest.raises(ValueError, match="twice"):
        reciprocal_rank_fusion([["a", "a"]])
    with pytest.raises(ValueError, match="k must be"):
        reciprocal_rank_fusion([["a"]], k=0)
    assert reciprocal_rank_fusion([[], []]) == []
