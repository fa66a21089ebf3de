"""PNG quicklooks of a finished output: class, probability and valid-observation maps per tile and
for the mosaic.

Rasters are read through their COG overviews (decimated reads), so neither a 3000 x 3000 px tile
nor a national VRT mosaic is ever loaded at full resolution; at most ``max_size`` pixels on the
long side are read.  Without COGs the mosaic falls back to a strided read of the Zarr store.
Figures are drawn with matplotlib's Agg canvas (no display, no pyplot state).

Files (default folder ``<output>/quicklook/``)::

    <tile>_class.png  <tile>_probability.png  <tile>_valid_obs.png     (class: multi-class only)
    mosaic_class.png  mosaic_probability.png  mosaic_valid_obs.png

and, where the map has them, ``_entropy``, ``_margin``, ``_least`` (uncertainty, 0 to 1),
``_class_smoothed``, ``_probability_smoothed`` and ``_alert_state`` (alert states).
"""

from __future__ import annotations

import colorsys
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import OutputError
from ..io import storage
from .schema import CLASS_DIM, NODATA

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "NOT_PREDICTED_COLOR",
    "Raster",
    "class_colors",
    "find_tiles",
    "plot_alerts",
    "plot_class",
    "plot_probability",
    "plot_uncertainty",
    "plot_valid_obs",
    "quicklook",
    "read_raster",
]

log = logging.getLogger(__name__)

#: colour of pixels that were not predicted (nodata)
NOT_PREDICTED_COLOR = "#d0d0d0"
#: long side, in pixels, of the raster read for a quicklook
MAX_SIZE = 1500
MOSAIC = "mosaic"
#: the layers drawn (where the map has them)
_LAYERS = ("probability", "class", "valid_obs", "class_smoothed", "probability_smoothed",
           "entropy", "margin", "least", "alert_state")  # fmt: skip
_DPI = 100
# tab20 without its greys (grey is "not predicted"): dark shades first, then the light ones
_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#dbdb8d",
    "#9edae5",
)


def class_colors(n: int) -> list[str]:
    """``n`` distinct ``#rrggbb`` colours, the same for class ``i`` in every map and STAC item."""
    colors = list(_PALETTE[:n])
    for i in range(len(colors), n):  # more classes than the palette: golden-ratio hues
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.85)
        colors.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return colors


@dataclass(frozen=True)
class Raster:
    """A (possibly decimated) raster read for display."""

    data: np.ndarray  # (bands, rows, cols)
    descriptions: tuple[str | None, ...]
    nodata: float | None
    crs: str
    resolution: float  # source pixel size (map units)
    full_shape: tuple[int, int]  # (rows, cols) at full resolution

    @property
    def shown_resolution(self) -> float:
        return self.resolution * self.full_shape[1] / self.data.shape[-1]

    def nodata_mask(self) -> np.ndarray:
        """(rows, cols) True where every band is nodata."""
        if self.nodata is None:
            return np.zeros(self.data.shape[-2:], bool)
        if isinstance(self.nodata, float) and math.isnan(self.nodata):
            return np.isnan(self.data).all(axis=0)
        return (self.data == self.nodata).all(axis=0)


def _out_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    factor = max(1.0, max(height, width) / max_size)
    return max(1, round(height / factor)), max(1, round(width / factor))


def read_raster(url: str, max_size: int = MAX_SIZE) -> Raster:
    """Read a GeoTIFF/VRT at most ``max_size`` px on its long side (from overviews, nearest)."""
    import rasterio
    from rasterio.enums import Resampling

    try:
        with rasterio.open(storage.gdal_path(url)) as src:
            shape = _out_shape(src.height, src.width, max_size)
            data = src.read(out_shape=(src.count, *shape), resampling=Resampling.nearest)
            crs = src.crs.to_string() if src.crs else "unknown CRS"
            return Raster(
                data=data,
                descriptions=tuple(src.descriptions),
                nodata=src.nodata,
                crs=crs,
                resolution=abs(src.transform.a),
                full_shape=(src.height, src.width),
            )
    except rasterio.errors.RasterioIOError as exc:
        raise OutputError(f"cannot read {url} for a quicklook: {exc}") from exc


def _open_map(output: str):
    """The map as an xarray Dataset (raw values, lazily read, cropped to its tiles), or None."""
    from .repo import MapRepo

    repo = MapRepo(output)
    return repo.open_dataset() if repo.exists() else None


def _zarr_raster(ds, variable: str, max_size: int) -> Raster:
    """Strided read of a store variable (reads every chunk once; COG overviews are much faster)."""
    da = ds[variable]
    height, width = da.shape[-2:]
    step = max(1, math.ceil(max(height, width) / max_size))
    sub = da[..., ::step, ::step]
    data = np.asarray(sub.values).reshape(-1, *sub.shape[-2:])
    names = (
        tuple(str(n) for n in ds[CLASS_DIM].values)
        if variable in ("probability", "probability_smoothed")
        else (variable,)
    )
    crs = ds.rio.crs.to_string() if ds.rio.crs else "unknown CRS"
    nodata = None if variable == "valid_obs" else NODATA[variable]
    return Raster(data, names, nodata, crs, abs(ds.rio.transform().a), (height, width))


# ----------------------------------------------------------------------------------- figures
def _figure(raster: Raster, title: str) -> tuple[Figure, Axes]:
    """An Agg-rendered figure (no pyplot) with the map axes sized to the raster."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError("quicklooks need matplotlib: pip install matplotlib") from exc

    rows, cols = raster.data.shape[-2:]
    long_in = min(max(max(rows, cols) / _DPI, 4.0), 12.0)
    map_w, map_h = long_in * cols / max(rows, cols), long_in * rows / max(rows, cols)
    fig = Figure(figsize=(map_w + 2.8, map_h + 1.0), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    full_rows, full_cols = raster.full_shape
    fig.supxlabel(
        f"{raster.crs}, {full_cols} x {full_rows} px of {raster.resolution:g} m, shown at "
        f"{raster.shown_resolution:.4g} m; grey = not predicted",
        fontsize=7,
        color="0.3",
    )
    return fig, ax


def plot_class(raster: Raster, class_names: Sequence[str], title: str = "class") -> Figure:
    """Categorical class map with a legend of the class names (grey: not predicted)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    n = len(class_names)
    values = raster.data[0]
    bad = raster.nodata_mask() | (values >= n)
    colors = class_colors(n)
    cmap = ListedColormap(colors).with_extremes(bad=NOT_PREDICTED_COLOR)
    norm = BoundaryNorm(np.arange(-0.5, n + 0.5), n)
    fig, ax = _figure(raster, title)
    ax.imshow(np.ma.masked_array(values, bad), cmap=cmap, norm=norm, interpolation="nearest")
    handles = [Patch(facecolor=c, label=name) for c, name in zip(colors, class_names, strict=True)]
    handles.append(Patch(facecolor=NOT_PREDICTED_COLOR, label="not predicted"))
    fig.legend(handles=handles, loc="outside right upper", title="class", frameon=False)
    return fig


def plot_probability(raster: Raster, title: str = "probability") -> Figure:
    """Map of the highest class probability (the probability itself for one band), colour bar."""
    bad = raster.nodata_mask()
    data = raster.data.astype("float32")
    values = np.max(np.where(np.isnan(data), -1.0, data), axis=0)
    label = "highest class probability" if data.shape[0] > 1 else f"probability of {title}"
    return _continuous(raster, np.ma.masked_array(values, bad | (values < 0)), title, label, 0, 1)


#: colours of the alert states none, candidate, confirmed, retracted
ALERT_COLORS = ("#e8eedf", "#ff9f1c", "#c1121f", "#4ea8de")


def plot_alerts(raster: Raster, title: str = "alert state") -> Figure:
    """Map of the disturbance-alert states with their legend (grey: not predicted)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    from .schema import ALERT_STATES

    values = raster.data[0]
    bad = raster.nodata_mask() | (values >= len(ALERT_STATES))
    cmap = ListedColormap(ALERT_COLORS).with_extremes(bad=NOT_PREDICTED_COLOR)
    norm = BoundaryNorm(np.arange(-0.5, len(ALERT_COLORS) + 0.5), len(ALERT_COLORS))
    fig, ax = _figure(raster, title)
    ax.imshow(np.ma.masked_array(values, bad), cmap=cmap, norm=norm, interpolation="nearest")
    handles = [Patch(facecolor=c, label=k) for c, k in zip(ALERT_COLORS, ALERT_STATES, strict=True)]
    handles.append(Patch(facecolor=NOT_PREDICTED_COLOR, label="not predicted"))
    fig.legend(handles=handles, loc="outside right upper", title="alert", frameon=False)
    return fig


def plot_uncertainty(raster: Raster, title: str, label: str) -> Figure:
    """Map of an uncertainty layer (0 certain .. 1), colour bar."""
    values = raster.data[0].astype("float32")
    masked = np.ma.masked_array(values, np.isnan(values))
    return _continuous(raster, masked, title, label, 0, 1, "magma")


def plot_valid_obs(raster: Raster, title: str = "valid observations") -> Figure:
    """Map of the valid-observation count (0 = not predicted), colour bar."""
    values = raster.data[0]
    bad = values == 0
    vmax = float(values[~bad].max()) if (~bad).any() else 1.0
    masked = np.ma.masked_array(values, bad)
    return _continuous(raster, masked, title, "valid observations", 0, max(vmax, 1.0), "magma")


def _continuous(raster, values, title, label, vmin, vmax, cmap_name="viridis") -> Figure:
    import matplotlib

    cmap = matplotlib.colormaps[cmap_name].with_extremes(bad=NOT_PREDICTED_COLOR)
    fig, ax = _figure(raster, title)
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    return fig


# ----------------------------------------------------------------------------------- driver
def _exists(url: str) -> bool:
    fs, path = storage.get_fs(url)
    return fs.exists(path)


def _save(fig: Figure, url: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    fs, path = storage.get_fs(url)
    if not storage.is_remote(url):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, buf.getvalue())
    return url


def find_tiles(output: str) -> list[str]:
    """Sorted names of the tile folders under ``<output>/cog/`` that hold a probability COG."""
    cog_dir = storage.join(output, "cog")
    fs, path = storage.get_fs(cog_dir)
    if not fs.isdir(path):
        return []
    tiles = []
    for entry in fs.ls(path, detail=True):
        name = storage.basename(entry["name"])
        if entry["type"] == "directory" and _exists(storage.join(cog_dir, name, "probability.tif")):
            tiles.append(name)
    return sorted(tiles)


def _class_names(prob: Raster, output: str) -> list[str]:
    """Class names from the probability band descriptions, else the Zarr ``class_name`` coord."""
    if all(prob.descriptions):
        return [str(d) for d in prob.descriptions]
    ds = _open_map(output)
    if ds is not None:
        return [str(n) for n in ds[CLASS_DIM].values]
    return [f"class {i}" for i in range(prob.data.shape[0])]


def _render(layers: dict[str, Raster], name: str, output: str, out_dir: str) -> list[str]:
    written = []
    prob = layers["probability"]
    names = _class_names(prob, output)
    if "class" in layers:
        fig = plot_class(layers["class"], names, title=f"{name}: class")
        written.append(_save(fig, storage.join(out_dir, f"{name}_class.png")))
    title = f"{name}: probability" if len(names) > 1 else f"{name}: {names[0]}"
    fig = plot_probability(prob, title=title)
    written.append(_save(fig, storage.join(out_dir, f"{name}_probability.png")))
    if "valid_obs" in layers:
        fig = plot_valid_obs(layers["valid_obs"], title=f"{name}: valid observations")
        written.append(_save(fig, storage.join(out_dir, f"{name}_valid_obs.png")))
    figures = {
        "class_smoothed": lambda r: plot_class(r, names, title=f"{name}: class (smoothed)"),
        "probability_smoothed": lambda r: plot_probability(r, title=f"{name}: smoothed"),
        "entropy": lambda r: plot_uncertainty(r, f"{name}: entropy", "normalised entropy"),
        "margin": lambda r: plot_uncertainty(r, f"{name}: margin", "1 - (first - second)"),
        "least": lambda r: plot_uncertainty(r, f"{name}: least confidence", "1 - highest"),
        "alert_state": lambda r: plot_alerts(r, title=f"{name}: disturbance alerts"),
    }
    for var, draw in figures.items():
        if var in layers:
            written.append(_save(draw(layers[var]), storage.join(out_dir, f"{name}_{var}.png")))
    return written


def quicklook(
    output: str,
    out_dir: str | None = None,
    tiles: Sequence[str] | None = None,
    mosaic: bool = True,
    max_size: int = MAX_SIZE,
) -> list[str]:
    """Write PNG quicklooks of ``output`` per tile (``tiles``, default all under ``cog/``) and of
    the mosaic; returns the written URLs.  ``out_dir`` defaults to ``<output>/quicklook``."""
    out_dir = out_dir or storage.join(output, "quicklook")
    names = list(tiles) if tiles is not None else find_tiles(output)
    written: list[str] = []
    for tile in names:
        folder = storage.join(output, "cog", tile)
        urls = {v: storage.join(folder, f"{v}.tif") for v in _LAYERS}
        if not _exists(urls["probability"]):
            raise OutputError(f"tile {tile} has no {urls['probability']}; was it written?")
        layers = {v: read_raster(u, max_size) for v, u in urls.items() if _exists(u)}
        written += _render(layers, tile, output, out_dir)
    if mosaic:
        written += _mosaic(output, out_dir, max_size)
    if not written:
        raise OutputError(
            f"nothing to draw in {output}: no tile COGs under cog/ and no map (map.icechunk)"
        )
    log.info("wrote %d quicklook(s) to %s", len(written), out_dir)
    return written


def _mosaic(output: str, out_dir: str, max_size: int) -> list[str]:
    vrts = {v: storage.join(output, "cog", f"{v}.vrt") for v in _LAYERS}
    if _exists(vrts["probability"]):
        layers = {v: read_raster(u, max_size) for v, u in vrts.items() if _exists(u)}
        return _render(layers, MOSAIC, output, out_dir)
    ds = _open_map(output)
    if ds is None:
        log.warning("no mosaic quicklook: no cog/probability.vrt and no map in %s", output)
        return []
    log.info("no VRT mosaic in %s; reading the map (slower than COG overviews)", output)
    layers = {v: _zarr_raster(ds, v, max_size) for v in _LAYERS if v in ds}
    return _render(layers, MOSAIC, output, out_dir)
