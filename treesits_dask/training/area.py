"""Area estimation and accuracy assessment of a map from a stratified random sample of reference
points (Olofsson et al. 2014, "Good practices for estimating area and assessing accuracy of land
change", Remote Sensing of Environment 148, 42-57; the estimators of their section 5, which are
those of Olofsson et al. 2013 and Stehman 2014 for strata = map classes).

With ``A`` the mapped area of the whole map, ``W_i`` the share of map class (stratum) ``i``,
``n_ij`` the sample count of map class ``i`` and reference class ``j``, ``n_i.`` the sample
count of stratum ``i``:

* area proportions ``p_ij = W_i n_ij / n_i.``; the adjusted area of class ``j`` is
  ``A sum_i p_ij`` with standard error ``A sqrt(sum_i W_i^2 (n_ij/n_i.)(1 - n_ij/n_i.) /
  (n_i. - 1))`` and a 95 % confidence interval of ``1.96`` standard errors;
* user's accuracy ``U_i = n_ii / n_i.`` with variance ``U_i (1 - U_i) / (n_i. - 1)``;
* producer's accuracy ``P_j = p_jj / sum_i p_ij`` with the variance of their equation (7)
  (Olofsson et al. 2013, eq. 7), from the estimated pixel counts ``N_.j = sum_i N_i. n_ij / n_i.``;
* overall accuracy ``sum_j p_jj`` with variance ``sum_i W_i^2 U_i (1 - U_i) / (n_i. - 1)``.

Sample design (:func:`sample_sizes`, :func:`draw_sample`): per map class, the sample size that
gives a target standard error of its user's accuracy for an expected accuracy
(``n = U (1 - U) / SE^2 + 1``, from the variance above), and a stratified random sample of map
pixels drawn without replacement, chunk by chunk (the map is never loaded whole).

This module is longer than 400 lines because the estimator, the sample design and the reading of
the map's strata and of the reference points belong together and share the class conventions.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigError, InputDataError
from ..io import storage

__all__ = [
    "BINARY_THRESHOLD",
    "Z95",
    "AreaEstimate",
    "area_from_map",
    "campaign_sample",
    "draw_sample",
    "estimate_areas",
    "map_classes",
    "map_class_areas",
    "overall_sample_size",
    "plot_areas",
    "sample_sizes",
    "write_area_report",
]

log = logging.getLogger(__name__)

#: the normal quantile of a two-sided 95 % confidence interval
Z95 = 1.96


@dataclass(frozen=True)
class AreaEstimate:
    """Per class (the map's classes, in order): mapped and adjusted area (in the unit of the
    mapped areas), the adjusted area's standard error and 95 % interval half-width, user's and
    producer's accuracy with standard errors; overall accuracy; the sample counts (rows: map
    class, columns: reference class)."""

    classes: tuple[str, ...]
    mapped_area: tuple[float, ...]
    area: tuple[float, ...]
    area_se: tuple[float, ...]
    area_ci95: tuple[float, ...]
    users_accuracy: tuple[float, ...]
    users_accuracy_se: tuple[float, ...]
    producers_accuracy: tuple[float, ...]
    producers_accuracy_se: tuple[float, ...]
    overall_accuracy: float
    overall_accuracy_se: float
    counts: tuple[tuple[int, ...], ...]
    unit: str = "pixels"

    def to_dict(self) -> dict:
        """JSON-compatible (NaN for estimates without sample support becomes null)."""

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return {k: clean(v) for k, v in asdict(self).items()}

    def table(self) -> str:
        """A text table: one line per class."""
        w = max(8, *(len(c) for c in self.classes)) + 1
        head = (f"{'class':<{w}} {'mapped':>14} {'adjusted':>14} {'± 95% CI':>12} "
                f"{'users':>7} {'± SE':>6} {'producers':>9} {'± SE':>6}")  # fmt: skip
        lines = [f"area unit: {self.unit}", head]
        for k, name in enumerate(self.classes):
            lines.append(
                f"{name:<{w}} {self.mapped_area[k]:14.1f} {self.area[k]:14.1f} "
                f"{self.area_ci95[k]:12.1f} {self.users_accuracy[k]:7.3f} "
                f"{self.users_accuracy_se[k]:6.3f} {self.producers_accuracy[k]:9.3f} "
                f"{self.producers_accuracy_se[k]:6.3f}"
            )
        lines.append(
            f"overall accuracy {self.overall_accuracy:.3f} ± {self.overall_accuracy_se:.3f} (SE); "
            f"{int(np.sum(self.counts))} reference samples"
        )
        return "\n".join(lines)


def estimate_areas(
    counts, mapped_areas: Sequence[float], classes: Sequence[str] | None = None,
    unit: str = "pixels",
) -> AreaEstimate:  # fmt: skip
    """The stratified estimates from the sample ``counts`` (K x K; rows: map class = stratum,
    columns: reference class) and the ``mapped_areas`` (K) of the map classes."""
    n = np.asarray(counts, dtype=np.float64)
    a_map = np.asarray(mapped_areas, dtype=np.float64)
    k = len(a_map)
    if n.shape != (k, k):
        raise ConfigError(f"sample counts of shape {n.shape} for {k} map classes")
    if (n < 0).any() or (a_map < 0).any():
        raise ConfigError("sample counts and mapped areas must not be negative")
    classes = tuple(classes) if classes is not None else tuple(str(i) for i in range(k))
    total = a_map.sum()
    if total <= 0:
        raise InputDataError("the map has no mapped area")
    w = a_map / total
    n_i = n.sum(axis=1)
    sampled = n_i > 0
    if (~sampled & (a_map > 0)).any():
        missing = [classes[i] for i in np.flatnonzero(~sampled & (a_map > 0))]
        raise InputDataError(
            f"map classes {missing} have mapped area but no reference sample: every stratum "
            "needs samples (draw them with `sample`)"
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(sampled[:, None], n / n_i[:, None], 0.0)  # n_ij / n_i.
        p = w[:, None] * share
        denom = np.where(n_i > 1, n_i - 1, np.nan)[:, None]
        var_p = np.nansum(w[:, None] ** 2 * share * (1 - share) / denom, axis=0)
        area = total * p.sum(axis=0)
        area_se = total * np.sqrt(var_p)
        users = np.diag(share).copy()
        users[~sampled] = np.nan
        users_se = np.sqrt(users * (1 - users) / (n_i - 1))
        col = p.sum(axis=0)
        producers = np.diag(p) / col
        # Olofsson et al. (2013) eq. 7, with the estimated pixel counts of the reference classes
        n_pop = a_map  # the mapped areas play the role of N_i. (the unit cancels)
        n_dot = (n_pop[:, None] * share).sum(axis=0)
        producers_se = np.full(k, np.nan)
        for j in range(k):
            if not sampled[j] or n_dot[j] <= 0:
                continue
            term1 = (
                n_pop[j] ** 2 * (1 - producers[j]) ** 2 * users[j] * (1 - users[j])
                / (n_i[j] - 1)
            )  # fmt: skip
            others = [i for i in range(k) if i != j and n_i[i] > 1]
            term2 = producers[j] ** 2 * sum(
                n_pop[i] ** 2 * share[i, j] * (1 - share[i, j]) / (n_i[i] - 1) for i in others
            )
            producers_se[j] = math.sqrt((term1 + term2) / n_dot[j] ** 2)
        overall = float(np.trace(p))
        overall_se = float(np.sqrt(np.nansum(w**2 * users * (1 - users) / (n_i - 1))))
    return AreaEstimate(
        classes=classes,
        mapped_area=tuple(float(v) for v in a_map),
        area=tuple(float(v) for v in area),
        area_se=tuple(float(v) for v in area_se),
        area_ci95=tuple(float(Z95 * v) for v in area_se),
        users_accuracy=tuple(float(v) for v in users),
        users_accuracy_se=tuple(float(v) for v in users_se),
        producers_accuracy=tuple(float(v) for v in producers),
        producers_accuracy_se=tuple(float(v) for v in producers_se),
        overall_accuracy=overall,
        overall_accuracy_se=overall_se,
        counts=tuple(tuple(int(v) for v in row) for row in n),
        unit=unit,
    )


# ----------------------------------------------------------------------------- sample design
def sample_sizes(
    expected_users_accuracy: Mapping[str, float],
    target_se: float | Mapping[str, float],
    minimum: int = 0,
) -> dict[str, int]:
    """Samples per map class for a target standard error of each class's user's accuracy:
    ``n = U (1 - U) / SE^2 + 1`` (rounded up), at least ``minimum``."""
    out = {}
    for name, u in expected_users_accuracy.items():
        se = target_se[name] if isinstance(target_se, Mapping) else target_se
        if not 0 <= u <= 1 or se <= 0:
            raise ConfigError(f"class {name}: expected accuracy {u} in [0, 1], target SE {se} > 0")
        out[name] = max(int(minimum), math.ceil(u * (1 - u) / se**2) + 1)
    return out


def overall_sample_size(
    weights: Sequence[float], expected_users_accuracy: Sequence[float], target_se: float
) -> int:
    """Total sample size for a target standard error of the overall accuracy (Olofsson et al.
    2014, eq. 13: ``n = (sum_i W_i S_i / SE)^2`` with ``S_i = sqrt(U_i (1 - U_i))``)."""
    w = np.asarray(weights, float) / np.sum(weights)
    s = np.sqrt(np.asarray(expected_users_accuracy, float) * (1 - np.asarray(
        expected_users_accuracy, float)))  # fmt: skip
    return math.ceil((float(np.sum(w * s)) / target_se) ** 2)


def map_class_areas(classes, nodata: int = 255) -> dict[int, int]:
    """Pixels per class of a (lazy) class layer (an xarray DataArray or dask/numpy array),
    computed chunk by chunk."""
    import dask.array as da

    data = getattr(classes, "data", classes)
    data = data if isinstance(data, da.Array) else da.from_array(np.asarray(data))
    counts = da.bincount(data.ravel().astype(np.int64), minlength=256).compute()
    return {int(c): int(v) for c, v in enumerate(counts) if v and c != nodata}


def draw_sample(classes, sizes: Mapping[int, int], seed: int = 0, nodata: int = 255):
    """A stratified random sample of the pixels of the class layer ``classes`` (a 2-D xarray
    DataArray with ``x``/``y`` coordinates): ``sizes[c]`` pixels of class ``c`` (all of them where
    the class has fewer), without replacement, reproducible with ``seed``.  Returns
    ``(x, y, map_class)`` arrays of pixel centres, chunk by chunk (the layer is never loaded
    whole)."""
    import dask.array as da

    data = classes.data if isinstance(classes.data, da.Array) else da.from_array(classes.values)
    rng = np.random.default_rng(seed)
    # counts of each class per chunk, in row-major chunk order
    blocks = list(np.ndindex(*data.numblocks))
    per_block = da.stack([
        da.bincount(data.blocks[b].ravel().astype(np.int64), minlength=256) for b in blocks
    ]).compute()  # fmt: skip
    totals = per_block.sum(axis=0)
    wanted: dict[int, np.ndarray] = {}
    for c, n in sizes.items():
        if c == nodata or totals[c] == 0 or n <= 0:
            continue
        wanted[c] = np.sort(rng.choice(totals[c], size=min(n, totals[c]), replace=False))
    xs, ys, cs = [], [], []
    starts = np.vstack([np.zeros(256, np.int64), np.cumsum(per_block, axis=0)[:-1]])
    offsets = [np.cumsum((0, *c[:-1])) for c in data.chunks]
    for b, idx in enumerate(blocks):
        picks = {c: r for c, r in wanted.items()
                 if ((r >= starts[b, c]) & (r < starts[b, c] + per_block[b, c])).any()}  # fmt: skip
        if not picks:
            continue
        block = np.asarray(data.blocks[idx].compute())
        for c, ranks in picks.items():
            local = ranks[(ranks >= starts[b, c]) & (ranks < starts[b, c] + per_block[b, c])]
            flat = np.flatnonzero(block.ravel() == c)[local - starts[b, c]]
            r, col = np.divmod(flat, block.shape[1])
            ys.append(classes.y.values[offsets[0][idx[0]] + r])
            xs.append(classes.x.values[offsets[1][idx[1]] + col])
            cs.append(np.full(len(flat), c, dtype=np.int64))
    if not xs:
        return np.empty(0), np.empty(0), np.empty(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(cs)


# ----------------------------------------------------------------------------- reports
def plot_areas(estimate: AreaEstimate, title: str = "mapped and adjusted area"):
    """Mapped against adjusted area per class, with the 95 % interval (matplotlib Figure, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(estimate.classes)
    fig = Figure(figsize=(2.0 + 1.1 * k, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(k)
    ax.bar(x - 0.2, estimate.mapped_area, 0.4, label="mapped", color="#bcbd22")
    ax.bar(x + 0.2, estimate.area, 0.4, yerr=estimate.area_ci95, capsize=4,
           label="adjusted (95 % CI)", color="#1f77b4")  # fmt: skip
    ax.set_xticks(x, estimate.classes, rotation=20, ha="right")
    ax.set_ylabel(f"area ({estimate.unit})")
    ax.set_title(title)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def write_area_report(estimate: AreaEstimate, prefix: str) -> dict[str, str]:
    """Write ``<prefix>_area.json``, ``_area.csv`` (the table) and ``_area.png``."""
    import csv

    prefix = str(prefix)
    out = {k: f"{prefix}_area.{k}" for k in ("json", "csv", "png")}
    storage.publish_bytes(json.dumps(estimate.to_dict(), indent=2).encode(), out["json"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", f"mapped_area_{estimate.unit}", f"area_{estimate.unit}", "area_se",
                "area_ci95", "users_accuracy", "users_accuracy_se", "producers_accuracy",
                "producers_accuracy_se"])  # fmt: skip
    for k, name in enumerate(estimate.classes):
        w.writerow([name, estimate.mapped_area[k], estimate.area[k], estimate.area_se[k],
                    estimate.area_ci95[k], estimate.users_accuracy[k],
                    estimate.users_accuracy_se[k], estimate.producers_accuracy[k],
                    estimate.producers_accuracy_se[k]])  # fmt: skip
    storage.publish_bytes(buf.getvalue().encode(), out["csv"])
    png = io.BytesIO()
    plot_areas(estimate).savefig(png, format="png")
    storage.publish_bytes(png.getvalue(), out["png"])
    return out


# ----------------------------------------------------------------------------- on a map
#: the class layer of a binary map: probability at or above this is "disturbance"
BINARY_THRESHOLD = 0.5


def map_classes(output: str, layer: str = "class", as_of=None):
    """The class layer of an output's map used as strata: ``(DataArray uint8 (y, x), class
    names, pixel area in hectares)``.  ``layer``: ``class`` or ``class_smoothed`` (multi-class
    maps), ``probability`` or ``probability_smoothed`` (binary maps: 1 where the probability is at
    least 0.5, else 0), or ``alert_state`` (binary maps with alerts: the four states)."""
    from ..outputs.repo import MapRepo
    from ..outputs.schema import ALERT_STATES, CLASS_NODATA

    ds = MapRepo(output).open_dataset(as_of)
    names = [str(n) for n in ds["class_name"].values]
    if layer not in ds:
        raise ConfigError(
            f"the map of {output} has no layer {layer!r}; its layers: {', '.join(ds.data_vars)}"
        )
    if layer in ("class", "class_smoothed"):
        classes = ds[layer]
    elif layer in ("probability", "probability_smoothed"):
        if len(names) != 1:
            raise ConfigError(f"layer {layer!r} is for binary maps; use class or class_smoothed")
        p = ds[layer].isel(class_name=0)
        classes = (p >= BINARY_THRESHOLD).astype(np.uint8).where(p.notnull(), CLASS_NODATA)
        names = [f"no {names[0]}", names[0]]
    elif layer == "alert_state":
        classes = ds[layer]
        names = list(ALERT_STATES)
    else:
        raise ConfigError(f"layer {layer!r} cannot stratify a map; use class, class_smoothed, "
                          "probability, probability_smoothed or alert_state")  # fmt: skip
    a, e = ds.rio.transform().a, ds.rio.transform().e
    return (
        classes.astype(np.uint8).drop_vars("class_name", errors="ignore"),
        names,
        abs(a * e) / 1e4,
    )


def area_from_map(
    output: str,
    samples: str,
    layer: str = "class",
    label_column: str = "label",
    crs: str | None = None,
    as_of=None,
) -> AreaEstimate:
    """Area estimates of an output's map from reference points (``samples``: GeoPackage, GeoJSON
    or CSV, the reference class in ``label_column`` as a name or index): each point takes the map
    class of its pixel (the stratum), the mapped areas are the map's pixel counts (hectares)."""
    from ..io.crs import same_crs
    from .points import read_points

    classes, names, pixel_ha = map_classes(output, layer, as_of)
    counts = map_class_areas(classes)
    pts = read_points(samples, label_column=label_column, crs=crs)
    map_crs = classes.rio.crs.to_wkt()
    x, y = np.asarray(pts.x, float), np.asarray(pts.y, float)
    for c in set(pts.crs):
        if not same_crs(c, map_crs):
            from rasterio.warp import transform

            sel = np.array([pc == c for pc in pts.crs])
            tx, ty = transform(c, map_crs, x[sel], y[sel])
            x[sel], y[sel] = tx, ty
    tr = classes.rio.transform()
    col = np.floor((x - tr.c) / tr.a).astype(np.int64)
    row = np.floor((y - tr.f) / tr.e).astype(np.int64)
    h, w = classes.shape
    outside = (row < 0) | (row >= h) | (col < 0) | (col >= w)
    if outside.any():
        bad = [pts.describe(i) for i in np.flatnonzero(outside)[:3]]
        raise InputDataError(f"{samples}: {int(outside.sum())} sample(s) lie outside the map "
                             f"({'; '.join(bad)})")  # fmt: skip
    mapped = np.asarray(classes.values[row, col]) if classes.size < 5e7 else np.array(
        [int(classes[r, c]) for r, c in zip(row, col, strict=True)])  # fmt: skip
    reference = []
    for i, label in enumerate(pts.labels):
        if isinstance(label, str) and label in names:
            reference.append(names.index(label))
        elif isinstance(label, (int, np.integer)) or (isinstance(label, str) and label.isdigit()):
            reference.append(int(label))
        else:
            raise InputDataError(f"{pts.describe(i)}: reference label {label!r} is not a class "
                                 f"of the map ({', '.join(names)})")  # fmt: skip
    reference = np.array(reference)
    k = len(names)
    keep = mapped < k
    if (~keep).any():
        log.warning("%d sample(s) fall on pixels the map did not predict; left out",
                    int((~keep).sum()))  # fmt: skip
    n = np.zeros((k, k), dtype=np.int64)
    np.add.at(n, (mapped[keep], reference[keep]), 1)
    areas = [counts.get(c, 0) * pixel_ha for c in range(k)]
    return estimate_areas(n, areas, names, unit="ha")


def campaign_sample(
    output: str,
    dest: str,
    sizes: Mapping[str, int] | int,
    layer: str = "class",
    seed: int = 0,
    as_of=None,
) -> str:
    """A stratified random sample of an output's map for a field campaign: ``sizes`` points per
    map class (a number for every class, or per class name; :func:`sample_sizes` gives them from
    target standard errors), written to ``dest`` (.gpkg, .geojson, .csv) with the map class in
    column ``map_class``; the campaign adds the reference class (``label``)."""
    from .points import write_points

    classes, names, _ = map_classes(output, layer, as_of)
    per_class = (
        {c: int(sizes) for c in range(len(names))}
        if isinstance(sizes, int)
        else {names.index(k): int(v) for k, v in sizes.items()}
    )
    x, y, c = draw_sample(classes, per_class, seed=seed)
    ids = [f"s{i:05d}" for i in range(len(x))]
    return write_points(dest, x, y, [names[v] for v in c], classes.rio.crs.to_wkt(), ids,
                        label_column="map_class")  # fmt: skip
