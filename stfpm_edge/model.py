"""The STFPM pair, its loss and its anomaly map -- each defined once, here.

Training, evaluation and export all call these functions; the exported ONNX graph is ``STFPM``
itself, so the deployed map is this map.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import backbones
from .errors import StfpmError


def feature_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per position: 0.5 * || t/|t| - s/|s| ||^2 over channels -> [N, 1, h, w]."""
    return 0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(dim=1, keepdim=True)


def squared_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per position: the mean over channels of (t - s)^2 -> [N, 1, h, w] (EfficientAD's, for standardised levels)."""
    return (t - s).pow(2).mean(dim=1, keepdim=True)


METRICS = {"cosine": feature_distance, "l2": squared_distance}


def level_metrics(metric: str | Sequence[str], levels: int) -> tuple[str, ...]:
    """One metric name per level: a single name stands for every level, a sequence names each."""
    names = (metric,) * levels if isinstance(metric, str) else tuple(metric)
    if len(names) != levels or any(n not in METRICS for n in names):
        raise StfpmError(f"metrics {list(names)} for {levels} feature levels; give one of {', '.join(METRICS)} per level")
    return names


def stfpm_loss(t_feats: Sequence[torch.Tensor], s_feats: Sequence[torch.Tensor], hard_fraction: float = 0.0,
               metric: str | Sequence[str] = "cosine") -> torch.Tensor:
    """The paper's loss: per-position distance averaged over positions and batch, summed over levels.

    ``hard_fraction`` > 0: per level, only that fraction of the batch's positions with the largest
    distances contributes (EfficientAD's hard-feature loss: the student spends its capacity on the
    normal variation it does not yet fit, not on the positions it already matches). ``metric``:
    the per-position distance (``METRICS``; the paper's cosine, or l2 for standardised levels), one
    name for all levels or one per level (``level_metrics``).
    """
    total = 0.0
    for t, s, name in zip(t_feats, s_feats, level_metrics(metric, len(t_feats))):
        d = METRICS[name](t, s)
        if hard_fraction > 0:
            flat = d.flatten()
            d = flat.topk(max(1, math.ceil(hard_fraction * flat.numel())), sorted=False).values
        total = total + d.mean()
    return total


def anomaly_map(t_feats: Sequence[torch.Tensor], s_feats: Sequence[torch.Tensor], size: tuple[int, int],
                metric: str | Sequence[str] = "cosine", weights: Sequence[float] = ()) -> torch.Tensor:
    """Each level's teacher-student distance (``metric``: one for all levels or one per level), combined by ``combine_levels``."""
    names = level_metrics(metric, len(t_feats))
    keep = range(len(t_feats)) if not weights else [k for k, w in enumerate(weights) if w > 0]
    chosen = [weights[k] for k in keep] if weights else ()
    return combine_levels([METRICS[names[k]](t_feats[k], s_feats[k]) for k in keep], size, chosen)


def combine_levels(distances: Sequence[torch.Tensor], size: tuple[int, int], weights: Sequence[float] = ()) -> torch.Tensor:
    """Per-level distance maps [N, 1, h, w] upsampled (bilinear, align_corners=False) to ``size``; levels multiplied.

    ``weights``: one exponent per level (``MapPost.level_weights``): the map is the product of
    d_k ** w_k; a level of weight 0 is left out (its distance is not computed at all). () = all 1.
    """
    if weights and len(weights) != len(distances):
        raise StfpmError(f"{len(weights)} level weights for {len(distances)} feature levels")
    amap = None
    for k, d in enumerate(distances):
        w = weights[k] if weights else 1.0
        if w == 0:
            continue
        d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        if w != 1:
            d = d.clamp_min(0).pow(w)
        amap = d if amap is None else amap * d
    return amap


@dataclass(frozen=True)
class MemorySearch:
    """How the teacher's features become the rows a memory keeps and the queries it answers.

    ``aggregate``: each feature is first the mean of the a x a features around it (PatchCore's
    local neighbourhood; 1 = the feature itself). ``pool``: per level, the mean of k x k blocks
    (stride k): k^2 fewer query positions at that level, each one covering more of the image.
    Both apply identically when the bank is built and when it is searched (``memory_rows``), and
    both are plain average pooling in the exported graph. Stored in the checkpoint's metadata.
    """

    aggregate: int = 1
    pool: tuple[int, ...] = ()  # one factor per level; () = 1 at every level

    def __post_init__(self) -> None:
        if self.aggregate < 1 or self.aggregate % 2 == 0:
            raise StfpmError(f"memory aggregate must be an odd number of features (1, 3, 5), got {self.aggregate}")
        if any(int(k) < 1 for k in self.pool):
            raise StfpmError(f"memory pool factors must be at least 1, got {list(self.pool)}")

    def factor(self, level: int) -> int:
        return int(self.pool[level]) if level < len(self.pool) else 1

    def to_dict(self) -> dict:
        return {"aggregate": self.aggregate, "pool": [int(k) for k in self.pool]}

    @classmethod
    def from_dict(cls, d: dict | None) -> "MemorySearch":
        """``to_dict``'s inverse; None or {} (checkpoints from before the search had options) is the plain search."""
        d = d or {}
        return cls(int(d.get("aggregate", 1)), tuple(int(k) for k in d.get("pool", ())))


def memory_rows(t_feats: Sequence[torch.Tensor], search: MemorySearch) -> list[torch.Tensor]:
    """Teacher features [N, C, h, w] per level -> unit rows [N, h', w', C] (after ``search``'s pooling)."""
    out = []
    for level, t in enumerate(t_feats):
        t = t.float()
        if search.aggregate > 1:
            t = F.avg_pool2d(t, search.aggregate, stride=1, padding=search.aggregate // 2, count_include_pad=False)
        k = search.factor(level)
        if k > 1:  # a ragged edge block (a size not divisible by k) is the mean of what it covers; int(): constants at export
            ragged = int(t.shape[-2]) % k != 0 or int(t.shape[-1]) % k != 0
            t = F.avg_pool2d(t, k, stride=k, ceil_mode=ragged, count_include_pad=False)
        out.append(F.normalize(t, dim=1).permute(0, 2, 3, 1))
    return out


# --feature-norm: which teacher levels FeatureNorm standardises (its ``levels``; None = all). "deep": only the deepest,
# the finer ones raw and compared by the paper's cosine (checkpoint metadata "feature_norm" names the entry)
STANDARDISED_LEVELS: dict[str, tuple[int, ...] | None] = {"channel": None, "deep": (-1,)}


class FeatureNorm(nn.Module):
    """A feature pyramid whose levels (all, or the ones named) are standardised per channel with good-image statistics.

    ``(f - mean) / std`` per channel and level, the statistics taken from the teacher's features of
    the good training images (``channel_stats``): every channel's spread on good images counts
    alike, where raw features let the few channels with large values dominate. One subtract and
    multiply per feature, inside the exported graph.
    Standardised levels are compared by ``metric`` l2, the mean squared difference (EfficientAD's):
    a feature near the good mean is near zero once standardised, and the cosine of a near-zero
    vector is noise (measured on screw, cosine on standardised levels: image AUROC 0.086, the
    ranking inverted). A level left raw (``levels`` names the others) keeps the paper's cosine.
    ``metrics`` is one name per level. ``feature_info`` is the wrapped network's, so the wrapper
    stands wherever the network did.
    """

    def __init__(self, net: nn.Module, means: Sequence[torch.Tensor], stds: Sequence[torch.Tensor], levels: Sequence[int] | None = None):
        super().__init__()
        self.net = net
        self.feature_info = net.feature_info
        count = len(means)
        self.standardised = tuple(range(count)) if levels is None else tuple(sorted({k % count for k in levels}))
        self.metrics = tuple("l2" if k in self.standardised else "cosine" for k in range(count))
        for k in self.standardised:  # buffers only where used: a raw level costs nothing in the graph
            self.register_buffer(f"mean{k}", means[k].float().reshape(1, -1, 1, 1).clone())
            self.register_buffer(f"inv_std{k}", (1.0 / stds[k].float()).reshape(1, -1, 1, 1).clone())

    @classmethod
    def empty(cls, net: nn.Module, levels: Sequence[int] | None = None) -> "FeatureNorm":
        """Placeholder statistics of the right shapes, to be overwritten by ``load_state_dict``."""
        chans = list(net.feature_info.channels())
        return cls(net, [torch.zeros(c) for c in chans], [torch.ones(c) for c in chans], levels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [(f - getattr(self, f"mean{k}")) * getattr(self, f"inv_std{k}") if k in self.standardised else f
                for k, f in enumerate(self.net(x))]


# a channel whose spread on good images is below this share of the level's median spread is scaled as if it had that
# spread: a nearly constant channel would otherwise turn tiny differences (noise, JPEG) into large distances
STD_FLOOR = 0.1


def channel_stats(batches: Iterable[Sequence[torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per level, the mean and (floored) standard deviation per channel over batches of feature levels [N, C, h, w]."""
    n, s1, s2 = None, None, None
    for levels in batches:
        f64 = [f.double() for f in levels]
        sums = [f.sum(dim=(0, 2, 3)) for f in f64]
        squares = [f.pow(2).sum(dim=(0, 2, 3)) for f in f64]
        counts = [f.shape[0] * f.shape[2] * f.shape[3] for f in f64]
        if n is None:
            n, s1, s2 = counts, sums, squares
        else:
            n = [a + b for a, b in zip(n, counts)]
            s1 = [a + b for a, b in zip(s1, sums)]
            s2 = [a + b for a, b in zip(s2, squares)]
    if n is None:
        raise StfpmError("feature statistics need at least one image")
    means, stds = [], []
    for count, a, b in zip(n, s1, s2):
        mean = a / count
        std = (b / count - mean.pow(2)).clamp_min(0).sqrt()
        means.append(mean.float())
        stds.append(std.clamp_min(max(float(std.median()) * STD_FLOOR, 1e-6)).float())
    return means, stds


class WholePart(nn.Module):
    """The part's layout, cell by cell: is what lies here like what lies here in some good image? (a missing or turned part)

    Each image is described by its deepest teacher level averaged over a coarse grid (``GRID`` x ``GRID``
    cells; a size not divisible gives ragged edge cells, the mean of what they cover), each cell's
    feature unit-length. ``rows``: the cells of every good training image, [images, cells, C]. A cell's
    distance is ``1 - cos`` to the same cell of the good image it is nearest to there. Only what lies
    beyond good variation counts: ``gain * relu(distance - offset)``, with ``offset`` the 99th percentile
    of the good images' cells' distances to the other good images and ``gain`` ``weight`` (train:
    ``whole_weight``) x the median good image score over the spread of those distances (their 99th
    percentile minus their median) — set at training from good images only (``train.calibrate_whole``).
    That excess, laid over the image (bilinear, like the levels), is added to the anomaly map, so the
    map marks where a part is missing and the image score (from the map) rises with it. On parts that
    vary in layout (a screw in any rotation) good cells are far from each other, the offset is large and
    the term stays silent.
    """

    GRID = 8

    def __init__(self, rows: torch.Tensor, level: int, offset: float = 0.0, gain: float = 0.0):
        super().__init__()
        if rows.ndim != 3:
            raise StfpmError("whole-part rows must be [images, cells, channels] (a model of an earlier development form: train it again)")
        self.register_buffer("rows", rows.float().contiguous())
        self.level, self.offset, self.gain = int(level), float(offset), float(gain)

    @classmethod
    def cells(cls, t: torch.Tensor) -> torch.Tensor:
        """Teacher level [N, C, h, w] -> unit cell features [N, C, gh, gw]."""
        t = t.float()
        h, w = int(t.shape[-2]), int(t.shape[-1])  # int(): the model size is fixed, constants at export
        kh, kw = -(-h // cls.GRID), -(-w // cls.GRID)
        ragged = h % kh != 0 or w % kw != 0
        return F.normalize(F.avg_pool2d(t, (kh, kw), stride=(kh, kw), ceil_mode=ragged, count_include_pad=False), dim=1)

    @classmethod
    def describe(cls, t: torch.Tensor) -> torch.Tensor:
        """Teacher level [N, C, h, w] -> the image's cells [N, cells, C] (the rows of a good image)."""
        return cls.cells(t).flatten(2).transpose(1, 2)

    def distance(self, t_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per cell, 1 - cos to that cell of its nearest good image: [N, 1, gh, gw]."""
        c = self.cells(t_feats[self.level])
        n, ch, gh, gw = c.shape
        q = c.flatten(2).permute(2, 0, 1)  # [cells, N, C]
        sim = torch.matmul(q, self.rows.permute(1, 2, 0)).amax(dim=2)  # [cells, N]: a MatMul and a ReduceMax in the graph
        return (1.0 - sim).clamp_min(0.0).transpose(0, 1).reshape(n, 1, gh, gw)

    def excess_map(self, t_feats: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``gain * relu(distance - offset)`` laid over the image: [N, 1, H, W]."""
        ex = self.gain * (self.distance(t_feats) - self.offset).clamp_min(0.0)
        return F.interpolate(ex, size=size, mode="bilinear", align_corners=False)

    def others_distances(self) -> torch.Tensor:
        """Every good image's cells against the other good images' (itself left out): [images, cells]. One cell at a time:
        an images x images similarity (100 MB for 5,000 images) rather than all 64 of them at once."""
        out = torch.empty(self.rows.shape[:2])
        for k in range(self.rows.shape[1]):
            cell = self.rows[:, k]
            sim = cell @ cell.T
            sim.fill_diagonal_(-1.0)
            out[:, k] = (1.0 - sim.amax(dim=1)).clamp_min(0.0).cpu()
        return out

    def to_dict(self) -> dict:
        return {"level": self.level, "grid": self.GRID, "offset": self.offset, "gain": self.gain, "rows": int(self.rows.shape[0])}


class MemoryBank(nn.Module):
    """The reference a student would learn, kept instead as the teacher's own features of good images.

    Per level, rows of unit-length teacher features (a coreset of the good training positions). A
    position's distance is ``feature_distance`` to its nearest row: for unit vectors
    0.5 * ||t/|t| - b||^2 = 1 - cos(t, b), so the map is the student's map with the nearest good
    feature in the student's place. Built at training time (``train._fit_memory``); no epochs.
    """

    # similarities per image held at once: bank rows per block = BLOCK / positions, 64 to 4096. 2 MB of them stay in
    # the CPU's caches between the MatMul that writes them and the ReduceMax that reads them; 64 MB blocks (before
    # issue 18) went to memory and back: the 32k graph took 1.6x as long on ONNX Runtime (docs/results/memory-speed.md)
    BLOCK = 1 << 19

    def __init__(self, banks: Sequence[torch.Tensor], search: MemorySearch | None = None, whole: WholePart | None = None):
        super().__init__()
        self.levels = len(banks)
        self.search = search or MemorySearch()
        for k, b in enumerate(banks):
            self.register_buffer(f"bank{k}", b.float().contiguous())
        self.whole = whole  # the whole-part term (None: positions only)

    def banks(self) -> list[torch.Tensor]:
        return [getattr(self, f"bank{k}") for k in range(self.levels)]

    def distances(self, t_feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for rows, bank in zip(memory_rows(t_feats, self.search), self.banks()):
            n, h, w, c = rows.shape
            q = rows.reshape(n, h * w, c)
            best = None
            chunk = max(64, min(4096, self.BLOCK // int(h * w)))  # the model size is fixed: a constant at export
            for i in range(0, bank.shape[0], chunk):  # unrolled at export: a few MatMul + ReduceMax
                sim = (q @ bank[i : i + chunk].T).amax(dim=2)
                best = sim if best is None else torch.maximum(best, sim)
            out.append((1.0 - best).clamp_min(0.0).reshape(n, 1, h, w))
        return out


# rows per block of the lazy greedy selection (benchmarks/memory_build.py: 512 against 1,024 and 2,048 on bottle's pools)
CORESET_BLOCK = 512


def greedy_coreset(x: torch.Tensor, k: int, generator: torch.Generator, tick=None) -> torch.Tensor:
    """Indices (CPU) of ``k`` rows of unit vectors ``x`` chosen by greedy k-centre (farthest point first).

    Every step adds the row farthest from the rows chosen so far. On a GPU, each step compares
    the new row with the whole pool (a 500,000-row pool in seconds). On the CPU the same
    selection is evaluated lazily (``_lazy_greedy``). ``generator`` is a CPU one. ``tick(n)``, when
    given, hears of every 1,024 rows chosen (a progress bar).
    """
    n = len(x)
    if k >= n:
        return torch.arange(n)
    first = int(torch.randint(n, (1,), generator=generator))
    if x.device.type == "cpu":
        return torch.from_numpy(_lazy_greedy(x.float().numpy(), k, first, tick))
    chosen = [first]
    nearest = 2.0 - 2.0 * (x @ x[first])  # squared distance to the closest chosen row
    for i in range(1, k):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, 2.0 - 2.0 * (x @ x[chosen[-1]]))
        if tick is not None and (i + 1) % 1024 == 0:
            tick(1024)
    return torch.tensor(chosen, dtype=torch.long)


def _lazy_greedy(x, k: int, first: int, tick=None, block: int = CORESET_BLOCK):
    """Greedy k-centre over unit rows ``x`` (a float32 NumPy array) from row ``first``, evaluated lazily.

    The farthest row from the chosen set is the one of lowest best similarity to it (unit rows:
    squared distance = 2 - 2 cos). The pool is cut into blocks of ``block`` rows, each with a
    lower bound of its rows' best similarity (it only rises as rows are chosen). Each step takes
    the block of the lowest bound; if rows were chosen since that block was last brought up to
    date, they are applied to it in one matrix product (all of them against the block, which stays
    in the caches) and the block goes back with its exact minimum; otherwise that minimum is the
    pool's, and its row is chosen. The selection is the plain algorithm's, but a block far from
    every new row is read only when it could hold the farthest row, then for many rows at once,
    instead of the whole pool being read once per chosen row (benchmarks/memory_build.py).
    """
    import heapq

    import numpy as np

    n = len(x)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = first
    centres = np.empty((k, x.shape[1]), dtype=np.float32)
    centres[0] = x[first]
    starts = range(0, n, block)
    blocks = [np.ascontiguousarray(x[a : a + block].T) for a in starts]  # [C, rows]: the product's max runs along rows
    best = [centres[0] @ b for b in blocks]  # per block, each row's best similarity to an applied centre
    applied = [1] * len(blocks)
    heap = []
    for b, s in enumerate(best):
        j = int(s.argmin())
        heap.append((float(s[j]), b, j))  # the block's lowest best similarity (a bound once stale) and where it is
    heapq.heapify(heap)
    item = heapq.heappop(heap)
    for i in range(1, k):
        while True:
            b = item[1]
            if applied[b] < i:  # stale: bring the block up to date, back with its exact minimum
                s = best[b]
                np.maximum(s, (centres[applied[b] : i] @ blocks[b]).max(axis=0), out=s)
                applied[b] = i
                j = int(s.argmin())
                item = heapq.heappushpop(heap, (float(s[j]), b, j))
                continue
            row = starts[b] + item[2]  # up to date and lowest: the pool's farthest row
            chosen[i] = row
            centres[i] = x[row]
            item = heapq.heappushpop(heap, item)  # its bound still holds; brought up to date when it next comes first
            break
        if tick is not None and (i + 1) % 1024 == 0:
            tick(1024)
    return chosen


def coreset_levels(pools: Sequence[torch.Tensor], sizes: Sequence[int], generator: torch.Generator, tick=None) -> list[torch.Tensor]:
    """``greedy_coreset`` of each level's pool (``sizes[k]`` rows of ``pools[k]``), the levels side by side on the CPU.

    On the CPU each level's selection runs in its own thread with single-threaded BLAS, the largest pool first: the
    selection is matrix products between short stretches of Python, and two levels at once keep both cores busy where
    one level with two BLAS threads leaves one idle between products (benchmarks/memory_build.py). The first row of
    each level is drawn from ``generator`` in level order, so the selection does not depend on which thread runs first.
    """
    if any(p.device.type != "cpu" for p in pools):  # a GPU: one level after another, each in seconds
        return [greedy_coreset(p, k, generator, tick) for p, k in zip(pools, sizes)]
    firsts = [int(torch.randint(len(p), (1,), generator=generator)) for p in pools]
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    def one(level: int) -> torch.Tensor:
        pool, k = pools[level], sizes[level]
        if k >= len(pool):
            return torch.arange(len(pool))
        return torch.from_numpy(_lazy_greedy(pool.float().numpy(), k, firsts[level], tick))

    order = sorted(range(len(pools)), key=lambda k: -len(pools[k]) * pools[k].shape[1])
    with threadpool_limits(1), ThreadPoolExecutor(max(1, min(2, torch.get_num_threads(), len(pools)))) as ex:
        done = dict(zip(order, ex.map(one, order)))
    return [done[k] for k in range(len(pools))]


def image_score(amap: torch.Tensor, topk: int = 1) -> torch.Tensor:
    """Image score = max of the map (``topk`` = 1), or the mean of its ``topk`` largest values -> [N]."""
    flat = amap.flatten(1)
    if topk <= 1:
        return flat.amax(dim=1)
    return flat.topk(min(topk, flat.shape[1]), dim=1).values.mean(dim=1)


@dataclass(frozen=True)
class MapPost:
    """What happens to the product map before it is reported and scored (stored in the checkpoint).

    ``blur_sigma``: Gaussian smoothing in model-input pixels (0 = none), normalised at the borders
    so that a flat map stays flat. ``topk_fraction``: the image score is the mean of this fraction
    of the map's largest pixels (0 = the single maximum, the paper's rule). ``level_weights``: one
    exponent per feature level in the product of the levels' distances (() = all 1, the paper's
    product; 0 leaves a level out of the map, though a student still learns it). All run inside
    ``STFPM.forward``, so evaluation and every exported engine apply them identically.
    """

    blur_sigma: float = 0.0
    topk_fraction: float = 0.0
    level_weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "level_weights", tuple(float(w) for w in self.level_weights))  # a checkpoint's JSON list
        if self.level_weights and (any(not 0.0 <= w <= 8.0 for w in self.level_weights) or not any(self.level_weights)):
            raise StfpmError(f"level weights must be between 0 and 8 with at least one above 0, got {list(self.level_weights)}")
        if not (0.0 <= self.blur_sigma <= 64.0):
            raise StfpmError(f"map blur sigma must be between 0 and 64 pixels, got {self.blur_sigma}")
        if not (0.0 <= self.topk_fraction < 1.0):
            raise StfpmError(f"score top-k fraction must be in [0, 1), got {self.topk_fraction}")

    def topk(self, height: int, width: int) -> int:
        # TensorRT's TopK takes k <= 3840
        # int(): under the ONNX tracer sizes are tensors; the model size is fixed, so k is a constant
        return 1 if self.topk_fraction <= 0 else max(1, min(3840, round(self.topk_fraction * int(height) * int(width))))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["level_weights"] = list(self.level_weights)
        return d


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur_map(amap: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian with zero padding, divided by the blurred ones (exact at the borders).

    Zero padding and plain convolutions only, so every ONNX consumer (TensorRT included) runs it.
    """
    r = kernel.numel() // 2
    kh, kw = kernel.view(1, 1, -1, 1), kernel.view(1, 1, 1, -1)

    def sep(x):
        return F.conv2d(F.conv2d(x, kh, padding=(r, 0)), kw, padding=(0, r))

    return sep(amap) / sep(torch.ones_like(amap[:1]))


def check_level_count(post: MapPost, levels: int) -> None:
    """``post``'s level weights (if any) must be one per feature level of the model they apply to."""
    if post.level_weights and len(post.level_weights) != levels:
        raise StfpmError(f"{len(post.level_weights)} level weights ({','.join(f'{w:g}' for w in post.level_weights)}) for a model of "
                         f"{levels} feature levels; give one per level")


class STFPM(nn.Module):
    """Teacher + student. ``forward`` takes uint8 BGR frames [N, H, W, 3] at model size.

    The student slot holds either the student network (the paper) or a ``MemoryBank`` of the
    teacher's good features (``--reference memory``); the map is the same function of both.

    Casting, BGR->RGB and mean/std normalisation happen here (so also inside the exported graph):
    the deploy side only resizes. ``features`` takes already normalised float input, for training.
    """

    def __init__(self, backbone: str, teacher: nn.Module, student: nn.Module, post: MapPost | None = None):
        super().__init__()
        s = backbones.spec(backbone)
        self.backbone = backbone
        self.teacher = teacher
        self.student = student
        self.set_post(post or MapPost())
        # x_norm = (pixel/255 - mean) / std, folded into one multiply-add per channel (RGB order)
        mean = torch.tensor(s.mean).view(1, 3, 1, 1)
        std = torch.tensor(s.std).view(1, 3, 1, 1)
        self.register_buffer("in_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("in_shift", -mean / std, persistent=False)

    @property
    def metric(self) -> tuple[str, ...]:
        """The per-position distance of this pair, one per level: the paper's cosine, or l2 at a standardised level (``FeatureNorm``)."""
        return getattr(self.teacher, "metrics", None) or ("cosine",) * len(self.teacher.feature_info.channels())

    def set_post(self, post: MapPost) -> None:
        """Change the map post-processing (smoothing, level weights, score aggregation) in place."""
        check_level_count(post, len(self.teacher.feature_info.channels()))
        self.post = post
        kernel = gaussian_kernel(post.blur_sigma) if post.blur_sigma > 0 else torch.zeros(0)
        self.register_buffer("blur_kernel", kernel, persistent=False)

    @classmethod
    def build(cls, backbone: str, teacher_weights: str | Path | None = None, pretrained: bool = True,
              layers: Sequence[int] | None = None, post: MapPost | None = None) -> "STFPM":
        """The teacher with ImageNet weights and a random student of the same network."""
        teacher = backbones.create_teacher(backbone, teacher_weights, layers) if pretrained else _frozen(backbones.create_features(backbone, layers))
        return cls(backbone, teacher, create_student(backbone, layers, teacher), post).to(memory_format=torch.channels_last)

    def half_backbones(self) -> "STFPM":
        """Networks in FP16 (the FP16 export); the head and a memory bank stay FP32 (distances near 0 need the bits)."""
        self.teacher.half()
        if not isinstance(self.student, MemoryBank):
            self.student.half()
        return self

    def train(self, mode: bool = True) -> "STFPM":
        super().train(mode)
        self.teacher.eval()  # frozen: its batch-norm statistics never move
        return self

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 BGR NHWC -> float RGB NCHW, normalised for the backbone."""
        x = frames.permute(0, 3, 1, 2).to(torch.float32)
        x = x[:, [2, 1, 0]]  # BGR (OpenCV, cameras) -> RGB (ImageNet weights)
        # channels-last runs the depthwise convolutions ~1.9x faster on CPU (measured, training step)
        return (x * self.in_scale + self.in_shift).contiguous(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            t = self.teacher(x)
        return t, self.student(x)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(frames)
        # Backbones may run in FP16 (the FP16 export); the head (normalise, squared difference,
        # upsample, product) always runs in FP32, where squared sums cannot overflow.
        dtype = next(self.teacher.parameters()).dtype
        x_in = x if dtype == torch.float32 else x.to(dtype)
        layout = None
        if isinstance(self.student, MemoryBank):  # the nearest good feature in the student's place (FP32 bank)
            with torch.no_grad():
                t = [f.float() for f in self.teacher(x_in)]
            amap = combine_levels(self.student.distances(t), (x.shape[-2], x.shape[-1]), self.post.level_weights)
            if self.student.whole is not None and self.student.whole.gain > 0:
                layout = self.student.whole.excess_map(t, (x.shape[-2], x.shape[-1]))
        else:
            t, s = self.features(x_in)
            if dtype != torch.float32:
                t, s = [f.float() for f in t], [f.float() for f in s]
            amap = anomaly_map(t, s, (x.shape[-2], x.shape[-1]), self.metric, self.post.level_weights)
        if self.blur_kernel.numel():
            amap = blur_map(amap, self.blur_kernel)
        if layout is not None:  # already smooth (coarse cells, bilinear): added after the blur
            amap = amap + layout
        return amap, image_score(amap, self.post.topk(x.shape[-2], x.shape[-1]))


def create_student(name: str, layers: Sequence[int] | None, teacher: nn.Module) -> nn.Module:
    """A random feature pyramid of ``name`` whose levels have the teacher's widths (the distance compares them channel by channel)."""
    student = backbones.create_features(name, layers)
    theirs, ours = list(teacher.feature_info.channels()), list(student.feature_info.channels())
    if theirs != ours:
        raise StfpmError(f"student network {name} gives levels of {ours} channels, the teacher's have {theirs}")
    return student


def _frozen(m: nn.Module) -> nn.Module:
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def flops_per_frame(model: STFPM, height: int, width: int) -> float:
    """Floating-point operations for one frame (a multiply-add counts 2), by PyTorch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, height, width, 3, dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return float(counter.get_total_flops())
