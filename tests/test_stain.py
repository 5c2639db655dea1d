"""Stain normalizers: one interface, exact round trips, pass-through of blank images, and
Vahadane stains checked against an independent dictionary-learning reference."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from histoclass import stain
from histoclass.data import load_rgb
from histoclass.data.images import to_array
from histoclass.data.manifest import sample_path
from histoclass.stain._optical import rgb_to_lab, rgb_to_od, tissue_mask
from histoclass.stain._stains import concentrations

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def he() -> list[np.ndarray]:
    """The six real BreakHis images bundled with the package."""
    return [to_array(load_rgb(p)) for p in sorted(sample_path("breakhis").glob("*.png"))]


@pytest.fixture(scope="module")
def fitted(he: list[np.ndarray]) -> dict[str, stain.Normalizer]:
    return {m: stain.fit(m, he[0]) for m in stain.METHODS}


def _plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return type(value) in (str, int, float, bool)


@pytest.mark.parametrize("method", stain.METHODS)
def test_transform_keeps_shape_and_dtype(method, fitted, he):
    crop = he[3][5:106, 17:94]  # odd sizes, a view that is not contiguous
    out = fitted[method](crop, name="crop")
    assert out.shape == crop.shape and out.dtype == np.uint8
    assert fitted[method].method == method


@pytest.mark.parametrize("method", stain.METHODS)
def test_round_trip_gives_identical_output(method, fitted, he, tmp_path):
    norm = fitted[method]
    d = norm.to_dict()
    assert _plain(d) and d["method"] == method
    again = stain.from_dict(json.loads(json.dumps(d)))
    loaded = stain.load(stain.save(norm, tmp_path / "t.json"))
    unpickled = pickle.loads(pickle.dumps(norm))
    expected = norm(he[2])
    for other in (again, loaded, unpickled):
        assert other.key == norm.key
        np.testing.assert_array_equal(other(he[2]), expected)


def test_key_depends_on_fitted_target(he):
    a, b = stain.fit("vahadane", he[0]), stain.fit("vahadane", he[1])
    assert a.key != b.key and a.key.startswith("vahadane-")
    assert stain.fit("vahadane", he[0]).key == a.key  # deterministic fit


@pytest.mark.parametrize("method", stain.METHODS)
def test_normalizing_toward_itself_changes_little(method, fitted, he):
    norm = fitted[method]
    own = np.abs(norm(he[0]).astype(int) - he[0]).mean()
    other = np.abs(norm(he[3]).astype(int) - he[3]).mean()
    # Self-normalization only loses what two stains cannot explain; far below a real change.
    assert own < 0.03 * 255
    assert own < other / 2


@pytest.mark.parametrize("method", stain.METHODS)
def test_blank_and_mostly_white_images_pass_through_with_warning(method, fitted, he, caplog):
    white = np.full((64, 80, 3), 255, np.uint8)
    speck = white.copy()
    speck[:4, :30] = he[0][:4, :30]  # 2% of the pixels are tissue
    for img, name in ((white, "blank.png"), (speck, "speck.png")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="histoclass.stain"):
            out = fitted[method](img, name=name)
        np.testing.assert_array_equal(out, img)
        assert name in caplog.text and "unchanged" in caplog.text


@pytest.mark.parametrize("method", stain.METHODS)
def test_real_tissue_is_never_passed_through(method, fitted, he):
    ucsb = sorted(sample_path("ucsb").rglob("*.jpg"))[::8]
    for img in [*he[1:], *(to_array(load_rgb(p)) for p in ucsb)]:  # he[0] is the target
        out, reason = fitted[method].apply(img)
        assert reason is None and not np.array_equal(out, img)


def test_fit_rejects_blank_target_and_unknown_method(he):
    with pytest.raises(ValueError, match=r"target image 1 has 0\.0% tissue"):
        stain.fit("macenko", [he[0], np.full((32, 32, 3), 250, np.uint8)])
    with pytest.raises(ValueError, match=r"unknown stain method 'ruifrok'.*reinhard, macenko, "
                                         r"vahadane"):
        stain.fit("ruifrok", he[0])
    with pytest.raises(ValueError, match="unknown stain method 'nope'"):
        stain.from_dict({"method": "nope"})
    broken = stain.fit("reinhard", he[0]).to_dict()
    del broken["stds"]
    with pytest.raises(ValueError, match="reinhard stain target is missing field 'stds'"):
        stain.from_dict(broken)


def test_bad_arrays_are_named(fitted):
    with pytest.raises(ValueError, match=r"uint8 RGB image, got dtype float32"):
        fitted["reinhard"](np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"HxWx3 RGB array, got shape \(8, 8\)"):
        fitted["vahadane"](np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="not fitted"):
        stain.create("macenko")(np.zeros((8, 8, 3), np.uint8))


def test_load_reports_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        stain.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not a JSON stain target"):
        stain.load(tmp_path / "bad.json")


def test_reinhard_pools_several_targets(he):
    a, b = he[0], he[1]  # same size, so the pooled mean is the mean of the two means
    pooled = stain.fit("reinhard", [a, b])
    means = (rgb_to_lab(a).mean(1, dtype=np.float64) + rgb_to_lab(b).mean(1, dtype=np.float64))
    np.testing.assert_allclose(pooled.means, means / 2, rtol=1e-5)
    out = rgb_to_lab(pooled(he[4])).mean(1)
    np.testing.assert_allclose(out, pooled.means, atol=1.0)  # the output takes the target mean


def test_concentrations_match_a_generic_nonnegative_solver():
    from scipy.optimize import nnls

    rng = np.random.default_rng(3)
    stains = np.array([[0.65, 0.70, 0.29], [0.27, 0.57, 0.78]])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    od = rng.uniform(0, 1.5, (40, 3)).astype(np.float32)
    # 0.5 c'Gc - (Sx - lam)'c equals 0.5 |L'c - L^-1 (Sx - lam)|^2 + const with G = LL', so
    # scipy's active-set NNLS solves the same non-negative Lasso exactly.
    chol = np.linalg.cholesky(stains @ stains.T)
    for lam in (0.0, 0.01, 0.3):
        ours = concentrations(od, stains, lam)
        ref = [nnls(chol.T, np.linalg.solve(chol, stains @ x - lam))[0] for x in od]
        np.testing.assert_allclose(ours, ref, atol=1e-5)
        assert (ours == 0).any() or lam == 0.0  # the penalty really switches stains off


def test_vahadane_stains_match_independent_dictionary_learning(he):
    """Reference: scikit-learn's DictionaryLearning on the same pixels and objective as
    StainTools' ``spams.trainDL`` call (non-negative codes and atoms, L1 0.1, unit atoms)."""
    from sklearn.decomposition import DictionaryLearning

    img = he[1]
    od = rgb_to_od(img)[tissue_mask(img)]
    x = od[np.random.default_rng(1).integers(0, len(od), 1500)].astype(np.float64)
    ref = DictionaryLearning(n_components=2, alpha=0.1, positive_code=True, positive_dict=True,
                             fit_algorithm="cd", transform_algorithm="lasso_cd", random_state=0,
                             max_iter=100).fit(x).components_
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    ref = ref if ref[0, 0] >= ref[1, 0] else ref[[1, 0]]
    ours = stain.create("vahadane").stain_matrix_of(od)  # all tissue pixels, our subsample
    assert np.all((ours * ref).sum(axis=1) > 0.999)


def _shared_images(folder: str, n: int) -> list[np.ndarray]:
    files = sorted((SHARED / folder / "images").glob("*.png"))
    if not files:
        pytest.skip(f"real images not found in {SHARED / folder / 'images'} (../shared/data "
                    "is absent): skipping the check on the shared data set")
    return [to_array(load_rgb(p)) for p in files[:n]]


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_other_lab_images_take_the_target_stains(method):
    """UCSB tissue-microarray cores normalized toward a BreakHis target carry its stains."""
    target = _shared_images("breakhis-sample", 1)[0]
    norm = stain.fit(method, target)
    for src in _shared_images("ucsb-breast", 3):
        before = norm.stain_matrix_of(rgb_to_od(src)[tissue_mask(src)])
        out = norm(src)
        after = norm.stain_matrix_of(rgb_to_od(out)[tissue_mask(out)])
        cos_before = (before * norm.stain_matrix).sum(axis=1)
        cos_after = (after * norm.stain_matrix).sum(axis=1)
        assert np.all(cos_after > 0.99) and np.all(cos_after >= cos_before - 1e-3)


def test_stain_package_does_not_import_torch():
    code = ("import sys, histoclass.stain, histoclass.stain.batch; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
