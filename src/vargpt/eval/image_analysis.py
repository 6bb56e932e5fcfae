"""What the shapes world's judge sees in an image: its background and its objects, with their colour, shape,
size and position (:func:`analyse_image`), in four steps (numpy only, any size, PIL / tensor / array input):

1. background: the per-channel median of a 2-pixel border ring (shapes never cover the border), named after
   the nearest world background;
2. objects: pixels far from the background colour (> ``FOREGROUND_DISTANCE`` in RGB), grouped into
   8-connected components; tiny components (noise) are dropped. A component whose confident pixels fall into
   two palette colours (two shapes drawn less than a pixel apart) is split between them;
3. colour: the median RGB of an object's confident pixels, named after the nearest world colour;
4. shape, from a soft coverage map ``alpha`` (0 = background, 1 = object colour) estimated per pixel by least
   squares along the background-to-object colour direction in YCbCr, luminance weighted above chroma (codecs
   and decoders keep luminance sharper; JPEG halves chroma resolution), then contrast-stretched around 0.5
   (edge positions kept, noise and ringing below 0.25 removed). Anti-aliased or blurred edges count
   fractionally. Three features, each insensitive to blur:

   * ``fill`` = area / (width x height), width and height being the sums of the column / row maxima of alpha
     (a blurred step keeps its integral): square 1.0, circle pi/4 = 0.785, upright triangle 0.5;
   * ``skew``: skewness of the alpha mass along y: 0 for circles and squares, -0.57 for the world's upright
     triangles (mass towards the base);
   * ``square``: ``(k40 + k04 - 6 k22) / area^2`` from the fourth cumulants of the mass, which an isotropic
     blur leaves unchanged: 0 for a disc, -1/60 for an axis-aligned square.

   triangle if ``skew < -0.2`` or ``fill < 0.55``; otherwise square when the two square votes (anisotropy
   below -0.006, fill above 0.89, each scaled by its spread on degraded ground truth) sum above 0; else
   circle. Size (small / large) comes from the extent, position from the centroid (``shapes.position_of``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vargpt.data.shapes import BACKGROUNDS, COLOURS, position_of

# RGB distance from the background above which a pixel belongs to an object. The closest object colour to a
# world background (purple on gray) is 93 away; noise of sigma 10 per channel rarely exceeds 40.
FOREGROUND_DISTANCE = 40.0
# An object must cover this fraction of the image (the smallest world shape, a small triangle, covers 1.3 %).
MIN_OBJECT_AREA = 0.004
# Shape thresholds (see the module docstring); validated by vargpt.eval.judge.validate_judge.
TRIANGLE_FILL, TRIANGLE_SKEW, SQUARE_FILL, SQUARE_ANISOTROPY = 0.55, -0.2, 0.89, -0.006
# Extent (sqrt of width x height, fraction of the side) between small (0.14-0.16) and large (0.23-0.26) shapes.
LARGE_EXTENT = 0.195
# Inputs larger than this are reduced first (features are scale-free; the world renders at 64 px).
MAX_SIDE = 128
# Coverage below ALPHA_LOW is noise (0), above 1 - ALPHA_LOW is the object (1); chroma's least-squares weight.
ALPHA_LOW = 0.25
CHROMA_WEIGHT = 0.2

_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_BACKGROUND_RGB = np.array([BACKGROUNDS[b] for b in _BACKGROUND_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image. Fractions are of the image side (x, y, extent) or area (area)."""

    colour: str
    shape: str
    size: str
    position: str
    x: float
    y: float
    area: float
    extent: float
    fill: float
    skew: float
    square: float
    rgb: tuple[int, int, int]
    colour_distance: float  # RGB distance between the observed colour and the named one


@dataclass(frozen=True)
class Analysis:
    """What the judge sees in an image: its background and its objects, largest first."""

    background: str
    background_rgb: tuple[int, int, int]
    objects: tuple[DetectedObject, ...]


def to_rgb_array(image: Any) -> np.ndarray:
    """(H, W, 3) float32 in [0, 255] from a PIL image, a (3, H, W) / (H, W, 3) tensor or array.

    Float tensors and arrays are taken to be in [0, 1] (what ``generate`` returns), integer ones in [0, 255].
    """
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    else:
        if hasattr(image, "detach"):  # a torch tensor, without importing torch here
            image = image.detach().float().cpu().numpy() if image.is_floating_point() else image.cpu().numpy()
        array = np.asarray(image)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 3:
            raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
        if array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)
        if array.shape[-1] != 3:
            raise ValueError(f"expected 3 colour channels, got an array of shape {array.shape}")
        floating = np.issubdtype(array.dtype, np.floating)
        array = np.clip(array.astype(np.float32) * (255.0 if floating else 1.0), 0, 255)
    if max(array.shape[:2]) > MAX_SIDE:
        scale = MAX_SIDE / max(array.shape[:2])
        size = (max(1, round(array.shape[1] * scale)), max(1, round(array.shape[0] * scale)))
        array = np.asarray(Image.fromarray(array.round().astype(np.uint8)).resize(size, Image.BOX), np.float32)
    return array


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved by (dy, dx) with zero fill."""
    out = np.zeros_like(mask)
    H, W = mask.shape
    out[max(dy, 0) : H + min(dy, 0), max(dx, 0) : W + min(dx, 0)] = mask[
        max(-dy, 0) : H + min(-dy, 0), max(-dx, 0) : W + min(-dx, 0)
    ]
    return out


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        grown = mask.copy()
        for dy, dx in _NEIGHBOURS:
            grown |= _shift(mask, dy, dx)
        mask = grown
    return mask


def connected_components(mask: np.ndarray, min_pixels: int = 1) -> list[np.ndarray]:
    """8-connected components of a boolean mask with at least ``min_pixels`` pixels, as boolean masks.

    Label propagation (each pixel takes the smallest label around it) with pointer jumping, vectorised.
    """
    H, W = mask.shape
    big = H * W
    flat_index = np.arange(H * W, dtype=np.int64).reshape(H, W)
    labels = np.where(mask, flat_index, big)
    padded = np.full((H + 2, W + 2), big, dtype=np.int64)
    while True:
        padded[1:-1, 1:-1] = labels
        smallest = labels.copy()
        for dy, dx in _NEIGHBOURS:
            np.minimum(smallest, padded[1 + dy : H + 1 + dy, 1 + dx : W + 1 + dx], out=smallest)
        smallest = np.where(mask, smallest, big)
        # Pointer jumping: a label is a pixel of the same component; take that pixel's label.
        inside = smallest < big
        smallest[inside] = smallest.ravel()[smallest[inside]]
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    values, counts = np.unique(labels[mask], return_counts=True)
    return [labels == value for value, count in zip(values, counts, strict=True) if count >= min_pixels]


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour and its distance, for (..., 3) colours."""
    distances = np.linalg.norm(rgb[..., None, :] - palette, axis=-1)
    index = distances.argmin(-1)
    return index, np.take_along_axis(distances, index[..., None], -1)[..., 0]


def _confident(component: np.ndarray, distance_bg: np.ndarray) -> np.ndarray:
    """The pixels of a component that are (nearly) pure object colour: the farthest from the background."""
    values = distance_bg[component]
    return component & (distance_bg >= 0.75 * np.percentile(values, 95))


def _split_by_colour(component: np.ndarray, image: np.ndarray, distance_bg: np.ndarray) -> list[np.ndarray]:
    """Split a component whose confident pixels hold two or more palette colours (touching shapes)."""
    core = _confident(component, distance_bg)
    classes, _ = _nearest(image[core], _COLOUR_RGB)
    counts = np.bincount(classes, minlength=len(_COLOUR_NAMES))
    present = [c for c in range(len(_COLOUR_NAMES)) if counts[c] >= max(6, 0.15 * core.sum())]
    if len(present) < 2:
        return [component]
    # Every pixel of the component joins the colour of its nearest confident pixel of a present colour.
    core_yx = np.argwhere(core)
    keep = np.isin(classes, present)
    core_yx, classes = core_yx[keep], classes[keep]
    comp_yx = np.argwhere(component)
    nearest = ((comp_yx[:, None, :] - core_yx[None, :, :]) ** 2).sum(-1).argmin(1)
    parts = []
    for colour in present:
        part = np.zeros_like(component)
        chosen = comp_yx[classes[nearest] == colour]
        part[chosen[:, 0], chosen[:, 1]] = True
        parts.append(part)
    return parts


# RGB -> (Y, Cb, Cr) rows scaled by sqrt(weight): luminance counts fully, chroma at CHROMA_WEIGHT.
_YCC = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]], dtype=np.float32)


def _coverage(rgb: np.ndarray, bg: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Per-pixel fraction of object colour over the background (unclipped), by weighted least squares.

    Luminance gets more weight than chroma because codecs and decoders keep it sharper (JPEG halves chroma
    resolution); where an object differs from its background mostly in chroma (green on gray) the chroma
    terms still carry the estimate, since each term is weighted by its contrast.
    """
    weights = np.sqrt(np.array([1.0, CHROMA_WEIGHT, CHROMA_WEIGHT], dtype=np.float32))[:, None]
    project = (_YCC * weights).T  # (3 RGB, 3 weighted YCC)
    direction = (colour - bg) @ project
    return ((rgb - bg) @ project @ direction) / max(float(direction @ direction), 1e-6)


def _shape_features(alpha: np.ndarray) -> dict[str, float]:
    """Area, extents, fill, vertical skewness, fourth-order anisotropy and centroid of a soft coverage map."""
    area = float(alpha.sum())
    width, height = float(alpha.max(0).sum()), float(alpha.max(1).sum())
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]]
    cy, cx = float((alpha * ys).sum() / area), float((alpha * xs).sum() / area)
    dy, dx = ys - cy, xs - cx

    def moment(p: int, q: int) -> float:
        return float((alpha * dx**p * dy**q).sum() / area)

    m20, m02, m11 = moment(2, 0), moment(0, 2), moment(1, 1)
    # Fourth cumulants are unchanged by an isotropic Gaussian blur; this combination is 0 for any isotropic
    # mass (a disc) and -1/60 of the squared area for an axis-aligned square.
    k40, k04 = moment(4, 0) - 3 * m20**2, moment(0, 4) - 3 * m02**2
    k22 = moment(2, 2) - m20 * m02 - 2 * m11**2
    return {
        "area": area,
        "width": width,
        "height": height,
        "fill": area / max(width * height, 1e-6),
        "skew": moment(0, 3) / max(m02, 1e-6) ** 1.5,
        "square": (k40 + k04 - 6 * k22) / max(area, 1e-6) ** 2,
        "cy": cy,
        "cx": cx,
    }


def classify_shape(fill: float, skew: float, square: float) -> str:
    """circle / square / triangle from the fill ratio, the vertical skewness and the square anisotropy."""
    if skew < TRIANGLE_SKEW or fill < TRIANGLE_FILL:
        return "triangle"
    # Two votes for square-ness, each scaled by its spread on degraded ground truth: anisotropy and fill.
    vote = (SQUARE_ANISOTROPY - square) / 0.004 + (fill - SQUARE_FILL) / 0.06
    return "square" if vote > 0 else "circle"


def analyse_image(image: Any) -> Analysis:
    """The background and the objects (largest first) of an image; see the module docstring."""
    rgb = to_rgb_array(image)
    H, W, _ = rgb.shape
    ring = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3),
                           rgb[:, -2:].reshape(-1, 3)])  # fmt: skip
    bg = np.median(ring, axis=0)
    bg_index, _ = _nearest(bg, _BACKGROUND_RGB)
    distance_bg = np.linalg.norm(rgb - bg, axis=-1)
    foreground = distance_bg > FOREGROUND_DISTANCE
    min_pixels = max(3.0, MIN_OBJECT_AREA * H * W)
    objects = []
    for component in connected_components(foreground, int(min_pixels / 2)):
        for part in _split_by_colour(component, rgb, distance_bg):
            core = _confident(part, distance_bg)
            colour_rgb = np.median(rgb[core], axis=0)
            colour_index, colour_distance = _nearest(colour_rgb, _COLOUR_RGB)
            # Soft coverage in the part's neighbourhood (its blurred edges), not elsewhere (other objects),
            # computed on the part's bounding box plus a margin.
            ys, xs = np.nonzero(part)
            y0, y1 = max(ys.min() - 3, 0), min(ys.max() + 4, H)
            x0, x1 = max(xs.min() - 3, 0), min(xs.max() + 4, W)
            window = (slice(y0, y1), slice(x0, x1))
            region = _dilate(part[window], 2) & ~(foreground[window] & ~part[window])
            alpha = _coverage(rgb[window], bg, colour_rgb)
            # Contrast stretch around 0.5: edge positions (where alpha crosses 0.5) and the integral of a
            # symmetric edge ramp are kept, while noise, ringing and compression artefacts below 0.25 vanish.
            alpha = np.where(region, np.clip((alpha - ALPHA_LOW) / (1 - 2 * ALPHA_LOW), 0.0, 1.0), 0.0)
            f = _shape_features(alpha)
            if f["area"] < min_pixels:
                continue
            f["cy"], f["cx"] = f["cy"] + y0, f["cx"] + x0
            extent = float(np.sqrt(f["width"] * f["height"])) / W
            x, y = (f["cx"] + 0.5) / W, (f["cy"] + 0.5) / H
            objects.append(
                DetectedObject(
                    colour=_COLOUR_NAMES[int(colour_index)],
                    shape=classify_shape(f["fill"], f["skew"], f["square"]),
                    size="large" if extent > LARGE_EXTENT else "small",
                    position=position_of(min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)),
                    x=x,
                    y=y,
                    area=f["area"] / (H * W),
                    extent=extent,
                    fill=f["fill"],
                    skew=f["skew"],
                    square=f["square"],
                    rgb=tuple(int(v) for v in colour_rgb.round()),
                    colour_distance=float(colour_distance),
                )
            )
    objects.sort(key=lambda o: o.area, reverse=True)
    return Analysis(_BACKGROUND_NAMES[int(bg_index)], tuple(int(v) for v in bg.round()), tuple(objects))
