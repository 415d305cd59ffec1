"""Data sets as tensors: synthetic ones generated from the seed, real ones from bundled or local files.

Every set is split into train/val with the seed and, when ``standardize`` is on, z-scored with the
training split's statistics (a best practice under study, so it can be switched off).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bpexp.config import ConfigError, DataConfig, DataName

# IDX type codes (LeCun's MNIST format): third byte of the magic number -> numpy dtype (big-endian).
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Dataset:
    x_train: torch.Tensor  # (n_train, in_dim)
    y_train: torch.Tensor  # (n_train, out_dim) float targets, or (n_train,) class indices
    x_val: torch.Tensor
    y_val: torch.Tensor
    n_classes: int | None  # None for regression

    @property
    def in_dim(self) -> int:
        return self.x_train.shape[1]

    @property
    def out_dim(self) -> int:
        return self.n_classes if self.n_classes is not None else self.y_train.shape[1]

    @property
    def classification(self) -> bool:
        return self.n_classes is not None

    def to(self, device: torch.device, dtype: torch.dtype) -> Dataset:
        def move(y: torch.Tensor) -> torch.Tensor:
            return y.to(device) if self.classification else y.to(device, dtype)

        return Dataset(
            self.x_train.to(device, dtype),
            move(self.y_train),
            self.x_val.to(device, dtype),
            move(self.y_val),
            self.n_classes,
        )


def make_data(cfg: DataConfig, seed: int) -> Dataset:
    """Build cfg.name's data (float64 on the CPU), split with the seed, standardized if asked."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.n_train + cfg.n_val
    x, y, n_classes = GENERATORS[cfg.name](cfg, n, g)
    order = torch.randperm(len(x), generator=g)
    x, y = x[order], y[order]
    n_val = min(cfg.n_val, len(x) // 2)  # real data sets may hold fewer than asked for
    n_train = min(cfg.n_train, len(x) - n_val)
    data = Dataset(
        x[:n_train], y[:n_train], x[n_train : n_train + n_val], y[n_train : n_train + n_val], n_classes
    )
    return standardized(data) if cfg.standardize else data


def standardized(data: Dataset) -> Dataset:
    """Z-score each feature with the training split's mean and std.

    A feature with no spread in training (a border pixel that is always 0) is centred but not scaled:
    dividing by a clamped std would blow the same feature in the validation split up to ~1e8.
    """
    mean = data.x_train.mean(0)
    std = data.x_train.std(0)
    std = torch.where(std > 1e-12 * mean.abs().clamp_min(1), std, torch.ones_like(std))
    return Dataset(
        (data.x_train - mean) / std, data.y_train, (data.x_val - mean) / std, data.y_val, data.n_classes
    )


def gaussian(cfg: DataConfig, n: int, g: torch.Generator):
    """x ~ N(0, I), y ~ N(0, I): no structure to learn, the standard input of signal-propagation studies."""
    x = torch.randn(n, cfg.in_dim, generator=g, dtype=torch.float64)
    y = torch.randn(n, cfg.out_dim, generator=g, dtype=torch.float64)
    return x, y, None


def teacher(cfg: DataConfig, n: int, g: torch.Generator, depth: int = 3, width: int = 32):
    """Regression on a random tanh teacher net (LeCun-initialized, so its outputs are O(1)), plus noise."""
    x = torch.randn(n, cfg.in_dim, generator=g, dtype=torch.float64)
    h = x
    for _ in range(depth):
        h = torch.tanh(
            h @ torch.randn(h.shape[1], width, generator=g, dtype=torch.float64) / h.shape[1] ** 0.5
        )
    h = h @ torch.randn(width, cfg.out_dim, generator=g, dtype=torch.float64) / width**0.5
    y = h + cfg.noise * torch.randn(n, cfg.out_dim, generator=g, dtype=torch.float64)
    return x, y, None


def spirals(cfg: DataConfig, n: int, g: torch.Generator):
    """Interleaved 2-D spirals, one arm per class (CS231n's classic), jittered by cfg.noise."""
    k = cfg.out_dim or 3
    label = torch.arange(n) % k
    r = torch.rand(n, generator=g, dtype=torch.float64)
    theta = label * (2 * math.pi / k) + 4 * r + cfg.noise * torch.randn(n, generator=g, dtype=torch.float64)
    x = torch.stack([r * torch.sin(theta), r * torch.cos(theta)], dim=1)
    return x, label, k


def blobs(cfg: DataConfig, n: int, g: torch.Generator):
    """One Gaussian cluster per class; centres ~ N(0, I), spread cfg.noise + 0.5 (overlapping)."""
    k = cfg.out_dim
    centres = torch.randn(k, cfg.in_dim, generator=g, dtype=torch.float64) * 2
    label = torch.arange(n) % k
    x = centres[label] + (0.5 + cfg.noise) * torch.randn(n, cfg.in_dim, generator=g, dtype=torch.float64)
    return x, label, k


def digits(cfg: DataConfig, n: int, g: torch.Generator):
    """scikit-learn's bundled 8×8 digits (1797 images, pixel values 0..16): real data, no download."""
    x, y = digits_arrays()
    return torch.from_numpy(x.astype(np.float64)), torch.from_numpy(y.astype(np.int64)), 10  # copies


@functools.cache
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled file, read once per process: a population's members share it. Read as
    load_digits reads it, without importing sklearn.datasets (~1 s, more than the file takes to read)."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():  # another layout: ask scikit-learn
        from sklearn.datasets import load_digits

        return load_digits(return_X_y=True)
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def idx(cfg: DataConfig, n: int, g: torch.Generator):
    """MNIST-format files in cfg.path: *-images-idx3-ubyte[.gz] with *-labels-idx1-ubyte[.gz].

    Train and test files (if both exist) are pooled, then split with the seed like every other set.
    Pixels are scaled to [0, 1].
    """
    folder = Path(cfg.path)
    images = sorted(p for p in folder.iterdir() if "images-idx" in p.name)
    if not images:
        raise FileNotFoundError(f"data.path={cfg.path!r} holds no *-images-idx3-ubyte[.gz] file")
    xs, ys = [], []
    for image_file in images:
        label_file = image_file.with_name(image_file.name.replace("images-idx3", "labels-idx1"))
        if not label_file.exists():
            raise FileNotFoundError(f"{image_file} has no labels file {label_file.name}")
        try:
            x, y = read_idx(image_file), read_idx(label_file)
        except (OSError, ValueError) as err:  # one line naming the file, like a config error
            raise ConfigError(f"data.path={cfg.path!r}: {err}") from None
        if len(x) != len(y):
            raise ValueError(f"{image_file.name} has {len(x)} images but {label_file.name} {len(y)} labels")
        xs.append(x.reshape(len(x), -1).astype(np.float64) / 255.0)
        ys.append(y.astype(np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    return torch.from_numpy(x), torch.from_numpy(y), int(y.max()) + 1


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file: magic (0, 0, type, ndim), ndim big-endian int32 sizes, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic {raw[:4].hex()})")
    type_code, ndim = raw[2], raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: header cut short ({len(raw)} bytes, {ndim} sizes need {4 + 4 * ndim})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[type_code])
    if len(raw) - 4 - 4 * ndim != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{path}: header says {shape} but holds {len(raw) - 4 - 4 * ndim} bytes of data")
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if dtype.kind == "f" and not np.isfinite(data).all():
        bad = int(np.size(data) - np.isfinite(data).sum())
        raise ValueError(
            f"{path}: {bad} non-finite values (inf or nan), first at flat index "
            f"{int(np.argmin(np.isfinite(data)))}; a model cannot learn from them"
        )
    return data.reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (the inverse of read_idx; used to make test fixtures and to export data)."""
    code = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}[array.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, array.ndim]) + b"".join(s.to_bytes(4, "big") for s in array.shape)
    body = array.astype(IDX_DTYPES[code]).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + body)


GENERATORS = {
    DataName.gaussian: gaussian,
    DataName.teacher: teacher,
    DataName.spirals: spirals,
    DataName.blobs: blobs,
    DataName.digits: digits,
    DataName.idx: idx,
}
