import numpy as np
import pytest

from itmatch.evaluation import contrast_accuracy, evaluate_sims, i2t_ranks, rank_metrics, t2i_ranks


def brute_i2t(sims: np.ndarray) -> np.ndarray:
    """The originals' loop: argsort each image's row, reverse, take the best of its 5 captions."""
    ranks = []
    for i in range(sims.shape[0]):
        inds = np.argsort(sims[i])[::-1]
        ranks.append(min(int(np.where(inds == c)[0][0]) for c in range(5 * i, 5 * i + 5)))
    return np.array(ranks)


def brute_t2i(sims: np.ndarray) -> np.ndarray:
    ranks = []
    for c in range(sims.shape[1]):
        inds = np.argsort(sims[:, c])[::-1]
        ranks.append(int(np.where(inds == c // 5)[0][0]))
    return np.array(ranks)


@pytest.mark.parametrize("n,seed", [(3, 0), (20, 1), (300, 2)])
def test_ranks_match_the_original_loops(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n, 5 * n))
    sims[rng.random(sims.shape) < 0.2] = 0.5  # many exact ties
    np.testing.assert_array_equal(i2t_ranks(sims)[0], brute_i2t(sims))
    np.testing.assert_array_equal(t2i_ranks(sims)[0], brute_t2i(sims))


def test_hand_computed_two_images() -> None:
    # image 0's captions are 0..4, image 1's 5..9.
    sims = np.array([
        [0.9, 0.1, 0.1, 0.1, 0.1, 0.95, 0.2, 0.2, 0.2, 0.2],  # best own caption (0.9) is 2nd -> rank 1
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.8, 0.1, 0.1, 0.1],  # caption 6 (own) is first -> rank 0
    ])
    ri, top1 = i2t_ranks(sims)
    assert ri.tolist() == [1, 0] and top1.tolist() == [5, 6]
    rt, _ = t2i_ranks(sims)
    # captions 0-4: image 0 scores higher (0.9/0.1 vs 0.0) -> rank 0; caption 5: image 0 (0.95) beats 0.3 -> 1;
    # 6: 0.8 > 0.2 -> 0; 7-9: 0.1 < 0.2 -> 1.
    assert rt.tolist() == [0, 0, 0, 0, 0, 1, 0, 1, 1, 1]
    res = evaluate_sims(sims)
    assert res["i2t"]["R@1"] == 50.0 and res["i2t"]["R@5"] == 100.0
    assert res["t2i"]["R@1"] == 60.0
    assert res["i2t"]["medr"] == 1.0  # median(0, 1) = 0.5 -> floor 0 -> +1
    assert res["i2t"]["meanr"] == 1.5
    assert res["t2i"]["meanr"] == pytest.approx(1.4)
    assert res["rsum"] == pytest.approx(50 + 100 + 100 + 60 + 100 + 100)


def test_medr_and_meanr_conventions() -> None:
    m = rank_metrics(np.array([0, 1, 4, 9]))
    assert m["medr"] == 3.0  # median 2.5 -> floor 2 -> +1
    assert m["meanr"] == pytest.approx(4.5)
    assert m["R@1"] == 25.0 and m["R@5"] == 75.0 and m["R@10"] == 100.0


def test_ties_follow_numpy_argsort_reversed() -> None:
    # All scores equal: the rank is wherever np.argsort(...)[::-1] puts the ground truth, as upstream.
    sims = np.zeros((2, 10))
    expect = brute_i2t(sims)
    assert i2t_ranks(sims)[0].tolist() == expect.tolist()
    assert t2i_ranks(sims)[0].tolist() == brute_t2i(sims).tolist()


def test_fold5_is_the_mean_of_five_blocks_and_rsum_is_recomputed() -> None:
    rng = np.random.default_rng(3)
    n = 50
    sims = rng.standard_normal((n, 5 * n)) + 3 * np.kron(np.eye(n), np.ones((1, 5)))
    res = evaluate_sims(sims, fold5=True)
    folds = [evaluate_sims(sims[10 * f : 10 * f + 10, 50 * f : 50 * f + 50]) for f in range(5)]
    for key in ("R@1", "R@5", "R@10", "medr", "meanr"):
        assert res["i2t"][key] == pytest.approx(np.mean([f["i2t"][key] for f in folds]))
        assert res["t2i"][key] == pytest.approx(np.mean([f["t2i"][key] for f in folds]))
    recomputed = sum(res[d][f"R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert res["rsum"] == pytest.approx(recomputed)
    assert res["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds]))


def test_bad_shape_is_refused() -> None:
    with pytest.raises(ValueError):
        evaluate_sims(np.zeros((3, 14)))


def test_contrast_accuracy_hand_case() -> None:
    sims = np.zeros((2, 10))
    sims[0, :5] = 1.0  # image 0 prefers its own captions; image 1 scores everything 0
    res = contrast_accuracy(sims, [(0, 1)])
    # t2i: captions 0-4: s(0,c)=1 > s(1,c)=0 (5 hits); captions 5-9: s(1,c)=0 > s(0,c)=0 false (0 hits).
    assert res["t2i"] == 50.0
    # i2t: image 0: 25 comparisons all true; image 1: 0 > 0 false.
    assert res["i2t"] == 50.0


# --------------------------------------------------------------------------------------------- bootstrap intervals
def _boot_oracle(ranks: dict, resamples: int, seed: int, level: float) -> dict:
    """Resample by resample with Python loops, from the draws `bootstrap_ci` documents."""
    from itmatch.evaluation import _BOOT_ELEMENTS

    per_dir, rsums = {}, [0.0] * resamples
    for d, (direction, r) in enumerate(ranks.items()):
        n, rng = len(r), np.random.default_rng([seed, d])
        rows = max(1, _BOOT_ELEMENTS // n)
        draws = np.concatenate([rng.integers(0, n, (min(rows, resamples - s), n)) for s in range(0, resamples, rows)])
        vals = {k: [] for k in (1, 5, 10)}
        for b in range(resamples):
            for k in (1, 5, 10):
                v = 100.0 * sum(int(r[i]) < k for i in draws[b]) / n
                vals[k].append(v)
                rsums[b] += v
        per_dir[direction] = {f"R@{k}": sorted(v) for k, v in vals.items()}
    return {"dirs": per_dir, "rsum": sorted(rsums)}


def _percentile(sorted_values: list[float], q: float) -> float:  # numpy's default ("linear") by hand
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def test_bootstrap_ci_matches_a_resample_by_resample_loop() -> None:
    from itmatch.evaluation import bootstrap_ci

    rng = np.random.default_rng(1)
    ranks = {"i2t": rng.integers(0, 12, 9), "t2i": rng.integers(0, 9, 45)}
    got = bootstrap_ci(ranks, resamples=200, seed=5, level=0.9)
    want = _boot_oracle(ranks, 200, 5, 0.9)
    for d in ("i2t", "t2i"):
        for k in ("R@1", "R@5", "R@10"):
            assert got[d][k] == pytest.approx([_percentile(want["dirs"][d][k], 5), _percentile(want["dirs"][d][k], 95)])
    assert got["rsum"] == pytest.approx([_percentile(want["rsum"], 5), _percentile(want["rsum"], 95)])
    assert (got["level"], got["resamples"], got["seed"]) == (0.9, 200, 5)


def test_bootstrap_ci_properties() -> None:
    from itmatch.evaluation import bootstrap_ci, evaluate_sims, query_ranks

    rng = np.random.default_rng(0)

    def noisy(n: int) -> np.ndarray:  # a model better than chance: the diagonal blocks get a bonus
        sims = rng.random((n, 5 * n))
        sims[np.repeat(np.arange(n), 5), np.arange(5 * n)] += 0.9
        return sims

    small, large = noisy(40), noisy(400)
    widths = []
    for sims in (small, large):
        res = evaluate_sims(sims)
        ci = bootstrap_ci(query_ranks(sims), seed=3)
        assert ci == bootstrap_ci(query_ranks(sims), seed=3), "deterministic with the seed"
        assert ci != bootstrap_ci(query_ranks(sims), seed=4)
        for d in ("i2t", "t2i"):
            for k in ("R@1", "R@5", "R@10"):
                assert ci[d][k][0] <= res[d][k] <= ci[d][k][1], (d, k)
        assert ci["rsum"][0] <= res["rsum"] <= ci["rsum"][1]
        widths.append(ci["t2i"]["R@1"][1] - ci["t2i"]["R@1"][0])
        # A proportion p over n queries: the 95 % interval is about p +- 1.96 sqrt(p (1 - p) / n).
        p, n = res["t2i"]["R@1"] / 100, sims.shape[1]
        assert widths[-1] == pytest.approx(100 * 2 * 1.96 * np.sqrt(p * (1 - p) / n), rel=0.25)
    assert widths[1] < widths[0] / 2, "ten times the queries: about a third of the width"
    perfect = bootstrap_ci({"i2t": np.zeros(5, int), "t2i": np.zeros(25, int)})
    assert perfect["rsum"] == [600.0, 600.0] and perfect["i2t"]["R@1"] == [100.0, 100.0]


def test_query_ranks_with_fold5_ranks_each_fold_on_its_own() -> None:
    from itmatch.evaluation import evaluate_sims, query_ranks

    sims = np.random.default_rng(2).random((10, 50))
    ranks = query_ranks(sims, fold5=True)
    assert ranks["i2t"].shape == (10,) and ranks["t2i"].shape == (50,)
    assert ranks["t2i"].max() < 2, "a fold of 2 images ranks captions among 2"
    folded = evaluate_sims(sims, fold5=True)
    assert folded["t2i"]["R@1"] == pytest.approx(100 * np.mean(ranks["t2i"] < 1))
