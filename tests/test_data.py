import gzip

import numpy as np
import pytest
import torch

from bpexp.config import DataConfig, DataName
from bpexp.data import Dataset, make_data, read_idx, standardized, write_idx


@pytest.mark.parametrize("name", ["gaussian", "teacher", "spirals", "blobs", "digits"])
def test_shapes_split_and_determinism(name):
    in_dim = 2 if name == "spirals" else (None if name == "digits" else 5)
    out_dim = None if name == "digits" else 3
    cfg = DataConfig(name=DataName(name), n_train=90, n_val=30, in_dim=in_dim, out_dim=out_dim)
    a, b, c = make_data(cfg, seed=0), make_data(cfg, seed=0), make_data(cfg, seed=1)
    assert a.x_train.shape == (90, a.in_dim) and a.x_val.shape == (30, a.in_dim)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.x_train, c.x_train)
    if a.classification:
        assert a.y_train.dtype == torch.long and int(a.y_train.max()) < a.n_classes
    else:
        assert a.y_train.shape == (90, 3)


def test_standardize_uses_training_statistics():
    raw = DataConfig(name=DataName.digits, in_dim=None, out_dim=None, standardize=False)
    std = DataConfig(name=DataName.digits, in_dim=None, out_dim=None, standardize=True)
    x_raw, x_std = make_data(raw, 0).x_train, make_data(std, 0).x_train
    assert x_raw.max() == 16  # raw 0..16 pixel values: the un-normalized input of the best-practice study
    varying = x_raw.std(0) > 0
    assert torch.allclose(x_std.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(x_std.std(0)[varying], torch.ones(int(varying.sum()), dtype=torch.float64))


def test_standardize_leaves_features_constant_in_training_unscaled():
    """A pixel constant in the training split but not in validation keeps its scale (std 1)."""
    x_train = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 5.0]], dtype=torch.float64)
    x_val = torch.tensor([[2.0, 3.0], [0.5, 1.0]], dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    data = standardized(Dataset(x_train, y, x_val, y[:2], n_classes=2))
    assert torch.equal(data.x_train[:, 0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(data.x_val[:, 0], torch.tensor([2.0, 0.5], dtype=torch.float64))
    assert torch.allclose(data.x_val[:, 1], torch.tensor([0.0, -1.0], dtype=torch.float64))


def test_digits_validation_stays_on_the_training_scale_for_every_seed():
    """digits at seed 2 has training-constant pixels that vary in validation (val/loss was ~1e5)."""
    cfg = DataConfig(
        name=DataName.digits, in_dim=None, out_dim=None, n_train=1400, n_val=397, standardize=True
    )
    for seed in range(4):
        data = make_data(cfg, seed)
        assert data.x_val.abs().max() < 100, seed


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_files_round_trip_and_load(tmp_path, suffix):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 7, size=50, dtype=np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels)
    assert np.array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), images)

    cfg = DataConfig(
        name=DataName.idx,
        n_train=40,
        n_val=10,
        in_dim=None,
        out_dim=None,
        path=str(tmp_path),
        standardize=False,
    )
    data = make_data(cfg, seed=0)
    assert data.x_train.shape == (40, 12) and data.n_classes == int(labels.max()) + 1
    pooled = sorted(map(tuple, torch.cat([data.x_train, data.x_val]).mul(255).round().long().tolist()))
    assert pooled == sorted(map(tuple, images.reshape(50, -1).astype(int).tolist()))


def test_idx_header_is_checked(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([1, 2, 8, 1, 0, 0, 0, 3, 1, 2, 3]))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(ValueError, match="header says"):
        read_idx(short)


def test_digits_are_read_as_scikit_learn_loads_them():
    """bpexp reads the bundled file itself (importing sklearn.datasets costs a run ~1 s): same arrays."""
    from sklearn.datasets import load_digits

    from bpexp.data import digits_arrays

    x, y = digits_arrays()
    expected_x, expected_y = load_digits(return_X_y=True)
    np.testing.assert_array_equal(x, expected_x)
    np.testing.assert_array_equal(y, expected_y)
    assert x.dtype == expected_x.dtype and y.dtype.kind == expected_y.dtype.kind == "i"
