"""Scenes (where the cells are) and window rendering for the synthetic smears (NumPy + OpenCV only).

A *style* fixes what one slide looks like (stain colours and strengths, background, blur, noise,
illumination, class mix, density). A *scene* is a set of cells and debris in global slide coordinates,
each with its own row of uniforms. :func:`render_window` renders any rectangle of a scene into RGB; the
same cell is drawn identically in every window, so tiles of a large virtual slide join seamlessly.

Image formation follows transmitted-light absorption: optical densities of a nuclear and a cytoplasmic
stain add up, and ``I = background * illumination * exp(-(OD_nuc * c_nuc + OD_cyto * c_cyto))`` per RGB
channel, then focus blur (on the densities), camera noise and 8-bit quantisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from smearsight.train.datasets.synth_cells import N_UNIFORMS, draw_cells, draw_tails

N_CLASSES = 6
# Ranges of the box's geometric mean side sqrt(w*h) sampled (inside the catalog ranges, with a margin for
# rasterisation); the drawers also keep the longer side within the catalog's upper limit.
SIZE_RANGES = ((31.0, 59.0), (21.0, 29.0), (13.0, 17.0), (9.0, 13.0), (9.0, 13.0), (9.0, 13.0))
# Typical mix in a testicular touch-print smear with active spermatogenesis (Sertoli cells are few).
BASE_MIX = np.array([0.04, 0.13, 0.30, 0.17, 0.13, 0.23])
_STAINS = {
    # (nuclear OD direction, cytoplasmic OD direction), RGB absorbance, before jitter.
    "he": ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11)),
    "diffquik": ((0.62, 0.78, 0.25), (0.55, 0.42, 0.15)),
    "pap": ((0.55, 0.72, 0.42), (0.30, 0.80, 0.35)),
}


@dataclass
class Style:
    """Everything that is constant over one slide (or one synthetic frame)."""

    od_nuc: np.ndarray
    od_cyto: np.ndarray
    background: np.ndarray  # RGB of the empty, lit slide (0..255)
    stain_strength: float
    blur_sigma: float
    noise_sigma: float
    vignette: float
    gradient: tuple[float, float]
    mix: np.ndarray
    cells_per_mpx: float
    cluster_fraction: float
    cluster_sigma: float
    plasma: float
    debris_per_mpx: float
    rbc_per_mpx: float
    waves: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float64))  # kx, ky, phase, amp


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.02, None)
    return v / np.linalg.norm(v)


def make_style(rng: np.random.Generator) -> Style:
    """A random, plausible stain/optics style."""
    name = ("he", "diffquik", "pap")[int(rng.choice(3, p=[0.45, 0.4, 0.15]))]
    nuc, cyto = (np.array(v, np.float64) for v in _STAINS[name])
    od_nuc = _unit(nuc + rng.normal(0, 0.07, 3))
    od_cyto = _unit(cyto + rng.normal(0, 0.08, 3))
    tint = rng.normal(0, 5, 3)
    background = np.clip(np.full(3, rng.uniform(222, 248)) + tint, 190, 254)
    mix = rng.dirichlet(BASE_MIX * 30.0)
    waves = np.zeros((4, 4))
    for i in range(4):
        wl = rng.uniform(700, 3000)
        th = rng.uniform(0, 2 * np.pi)
        waves[i] = (
            2 * np.pi / wl * math.cos(th),
            2 * np.pi / wl * math.sin(th),
            rng.uniform(0, 2 * np.pi),
            rng.uniform(0.1, 0.3),
        )
    return Style(
        od_nuc=od_nuc.astype(np.float32),
        od_cyto=od_cyto.astype(np.float32),
        background=background.astype(np.float32),
        stain_strength=float(rng.uniform(0.8, 1.2)),
        blur_sigma=float(rng.uniform(0.45, 1.05)),
        noise_sigma=float(rng.uniform(1.0, 4.5)),
        vignette=float(rng.uniform(0.0, 0.3)),
        gradient=(float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1))),
        mix=mix,
        cells_per_mpx=float(np.exp(rng.uniform(np.log(120), np.log(480)))),
        cluster_fraction=float(rng.uniform(0.25, 0.7)),
        cluster_sigma=float(rng.uniform(18, 55)),
        plasma=float(rng.uniform(0.02, 0.12)),
        debris_per_mpx=float(rng.uniform(60, 400)),
        rbc_per_mpx=float(rng.uniform(0, 25)),
        waves=waves,
    )


def smooth_field(style: Style, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """A slowly varying field around 1 over global coordinates (sum of plane waves, as one matrix product)."""
    if not len(style.waves):
        return np.ones((len(ys), len(xs)), np.float32)
    kx, ky, ph, amp = (style.waves[:, i][None, :] for i in range(4))
    ax = kx * np.asarray(xs, np.float64)[:, None]  # [W, K]
    ay = ky * np.asarray(ys, np.float64)[:, None] + ph  # [H, K]
    # sum_k amp cos(ax + ay) = [amp cos ay, -amp sin ay] @ [cos ax, sin ax]^T
    left = np.concatenate([amp * np.cos(ay), -amp * np.sin(ay)], axis=1).astype(np.float32)
    right = np.concatenate([np.cos(ax), np.sin(ax)], axis=1).astype(np.float32)
    # cv2.gemm: single-threaded here and fast; NumPy's BLAS may spin up threads for this tiny product.
    return cv2.gemm(left, right, 1.0, None, 0.0, flags=cv2.GEMM_2_T) + np.float32(1.0)


@dataclass
class Scene:
    """Cells and debris of one region (global coordinates). Boxes are filled in when cells are drawn."""

    cls: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    size: np.ndarray
    ang: np.ndarray
    u: np.ndarray
    debris: np.ndarray  # [M, 8]: kind, x, y, r, ang, u1, u2, u3
    boxes: np.ndarray  # [N, 4], NaN until drawn

    @property
    def reach(self) -> np.ndarray:
        """A radius around each cell centre that contains all it draws (tails included)."""
        tail = np.where(self.cls >= 3, self.size * 9.0, 0.0)
        return self.size * 0.9 + tail + 3.0


def make_scene(rng: np.random.Generator, style: Style, x0: float, y0: float, w: float, h: float) -> Scene:
    """Place cells (clustered, touching, partly overlapping) and debris in a region."""
    area = w * h / 1e6
    n_target = int(rng.poisson(style.cells_per_mpx * area))
    n_clusters = max(1, int(rng.poisson(6 * area)))
    centres = np.stack([rng.uniform(x0, x0 + w, n_clusters), rng.uniform(y0, y0 + h, n_clusters)], 1)
    # Candidates are drawn in one batch; the loop below only accepts or rejects them in order.
    n_cand = 5 * n_target + 20
    k_all = rng.choice(N_CLASSES, n_cand, p=style.mix)
    lo = np.array([r[0] for r in SIZE_RANGES])[k_all]
    hi = np.array([r[1] for r in SIZE_RANGES])[k_all]
    s_all = lo + (hi - lo) * rng.random(n_cand)
    clustered = rng.random(n_cand) < style.cluster_fraction
    which = rng.integers(0, n_clusters, n_cand)
    xy = np.where(
        clustered[:, None],
        centres[which] + rng.normal(0.0, style.cluster_sigma, (n_cand, 2)),
        np.stack([rng.uniform(x0, x0 + w, n_cand), rng.uniform(y0, y0 + h, n_cand)], 1),
    )
    keep_u = rng.random(n_cand)
    ang_all = rng.uniform(0, 2 * np.pi, n_cand)
    inside = (xy[:, 0] >= x0) & (xy[:, 0] < x0 + w) & (xy[:, 1] >= y0) & (xy[:, 1] < y0 + h)
    f = 1.0 + np.sum(
        style.waves[:, 3]
        * np.cos(np.outer(xy[:, 0], style.waves[:, 0]) + np.outer(xy[:, 1], style.waves[:, 1]) + style.waves[:, 2]),
        1,
    )
    inside &= keep_u < np.minimum(1.0, 0.35 + 0.65 * (f - 0.4))
    cell = 64.0
    grid: dict[tuple[int, int], list[int]] = {}
    boxes: list[tuple[float, float, float, float]] = []
    chosen: list[int] = []
    for c in np.flatnonzero(inside):
        if len(chosen) >= n_target:
            break
        x, y = float(xy[c, 0]), float(xy[c, 1])
        r = float(s_all[c]) * 0.5
        b = (x - r, y - r, x + r, y + r)
        gx, gy = int(x // cell), int(y // cell)
        ok = True
        for i in range(gx - 1, gx + 2):
            for j in range(gy - 1, gy + 2):
                for idx in grid.get((i, j), ()):
                    o = boxes[idx]
                    iw = min(b[2], o[2]) - max(b[0], o[0])
                    ih = min(b[3], o[3]) - max(b[1], o[1])
                    if iw > 0 and ih > 0 and iw * ih > 0.25 * min((b[2] - b[0]) ** 2, (o[2] - o[0]) ** 2):
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            grid.setdefault((gx, gy), []).append(len(boxes))
            boxes.append(b)
            chosen.append(int(c))
    idx = np.array(chosen, np.int64)
    n = len(idx)
    u = rng.random((n, N_UNIFORMS))
    m = int(rng.poisson(style.debris_per_mpx * area))
    m_rbc = int(rng.poisson(style.rbc_per_mpx * area))
    kinds = np.concatenate([rng.choice(3, m, p=[0.7, 0.22, 0.08]), np.full(m_rbc, 3)])
    mm = len(kinds)
    debris = np.zeros((mm, 8))
    debris[:, 0] = kinds
    debris[:, 1] = rng.uniform(x0, x0 + w, mm)
    debris[:, 2] = rng.uniform(y0, y0 + h, mm)
    debris[:, 3] = rng.random(mm)
    debris[:, 4] = rng.uniform(0, 2 * np.pi, mm)
    debris[:, 5:] = rng.random((mm, 3))
    return Scene(
        cls=k_all[idx].astype(np.int64),
        cx=xy[idx, 0],
        cy=xy[idx, 1],
        size=s_all[idx],
        ang=ang_all[idx],
        u=u,
        debris=debris,
        boxes=np.full((n, 4), np.nan),
    )


def make_textures(rng: np.random.Generator, n: int = 384) -> dict[str, np.ndarray]:
    """Noise banks for chromatin and cytoplasm texture: fine granular and band-pass 'threads'."""
    white = np.tile(rng.standard_normal((n, n)).astype(np.float32), (3, 3))  # blur a 3x3 tiling: periodic
    crop = (slice(n, 2 * n), slice(n, 2 * n))
    fine = np.ascontiguousarray(cv2.GaussianBlur(white, (0, 0), 0.8)[crop])
    fine /= fine.std() + 1e-6
    band = np.ascontiguousarray((cv2.GaussianBlur(white, (0, 0), 1.3) - cv2.GaussianBlur(white, (0, 0), 2.6))[crop])
    band /= band.std() + 1e-6
    return {"fine": fine, "thread": band}


def _draw_debris(nuc: np.ndarray, cyto: np.ndarray, debris: np.ndarray, ox: int, oy: int, dens: float) -> None:
    one = 16
    for kind, x, y, r, ang, u1, u2, u3 in debris:
        px, py = x - ox, y - oy
        if kind == 0:  # dark granule / nuclear fragment
            rad = 0.6 + 1.4 * r
            cv2.circle(nuc, (int(px * one), int(py * one)), int(rad * one), dens * (0.5 + 1.0 * u1), -1, cv2.LINE_8, 4)
        elif kind == 1:  # pink amorphous fragment
            n = 16
            t = np.linspace(0, 2 * np.pi, n, endpoint=False) + ang
            rr = (1.5 + 4.5 * r) * (1.0 + 0.35 * np.sin(t * 2.0 + u2 * 6) + 0.2 * np.sin(t * 3.0 + u3 * 6))
            pts = np.stack([px + rr * np.cos(t), py + rr * np.sin(t)], 1)
            cv2.fillPoly(cyto, [np.round(pts * one).astype(np.int32)], dens * (0.25 + 0.5 * u1), cv2.LINE_8, 4)
        elif kind == 2:  # fibre
            length = 20 + 60 * r
            t = np.linspace(0, 1, 12)
            phi = ang + (u2 - 0.5) * 2.0 * t
            xs = px + np.cumsum(np.cos(phi)) * length / 12
            ys = py + np.cumsum(np.sin(phi)) * length / 12
            pts = np.round(np.stack([xs, ys], 1) * one).astype(np.int32)
            cv2.polylines(cyto, [pts], False, dens * (0.2 + 0.3 * u1), 1, cv2.LINE_8, 4)
        else:  # red blood cell: an anucleate pink disc with a pale centre
            rad = 5.5 + 2.0 * r
            centre = (int(px * one), int(py * one))
            cv2.circle(cyto, centre, int(rad * one), dens * (0.55 + 0.25 * u1), -1, cv2.LINE_8, 4)
            cv2.circle(cyto, centre, int(rad * 0.45 * one), dens * (0.3 + 0.1 * u1), -1, cv2.LINE_8, 4)


def _add_patch(canvas: np.ndarray, patch: np.ndarray, px: int, py: int) -> None:
    h, w = canvas.shape
    ph, pw = patch.shape
    x0, y0 = max(px, 0), max(py, 0)
    x1, y1 = min(px + pw, w), min(py + ph, h)
    if x1 <= x0 or y1 <= y0:
        return
    canvas[y0:y1, x0:x1] += patch[y0 - py : y1 - py, x0 - px : x1 - px]


def render_od(
    scenes: list[Scene], style: Style, textures: dict[str, np.ndarray], x0: int, y0: int, w: int, h: int
) -> tuple[np.ndarray, np.ndarray]:
    """Blurred nuclear and cytoplasmic OD of the window ``[x0, x0+w) x [y0, y0+h)`` (global pixels).

    Also records each drawn cell's exact global box in ``scene.boxes``.
    """
    m = int(math.ceil(3.0 * style.blur_sigma)) + 2
    X0, Y0, W, H = x0 - m, y0 - m, w + 2 * m, h + 2 * m
    xs = np.arange(X0, X0 + W, dtype=np.float32)
    ys = np.arange(Y0, Y0 + H, dtype=np.float32)
    field = smooth_field(style, xs, ys)
    dens = style.stain_strength
    cyto = (np.float32(style.plasma * dens) * field).astype(np.float32)
    fine = textures["fine"]
    th, tw = fine.shape
    iy = np.mod(np.arange(Y0, Y0 + H), th)
    ix = np.mod(np.arange(X0, X0 + W), tw)
    cyto *= 1.0 + 0.25 * fine[np.ix_(iy, ix)]
    nuc = np.zeros((H, W), np.float32)
    for sc in scenes:
        d = sc.debris
        if len(d):
            sel = (d[:, 1] > X0 - 90) & (d[:, 1] < X0 + W + 90) & (d[:, 2] > Y0 - 90) & (d[:, 2] < Y0 + H + 90)
            _draw_debris(nuc, cyto, d[sel], X0, Y0, dens)
    patches = []
    for sc in scenes:
        reach = sc.reach
        sel = np.flatnonzero(
            (sc.cx + reach > X0) & (sc.cx - reach < X0 + W) & (sc.cy + reach > Y0) & (sc.cy - reach < Y0 + H)
        )
        for k in range(N_CLASSES):
            idx = sel[sc.cls[sel] == k]
            drawn = draw_cells(k, sc.cx[idx], sc.cy[idx], sc.size[idx], sc.ang[idx], sc.u[idx], textures, dens)
            for i, p in zip(idx, drawn, strict=True):
                if p.box is not None:
                    sc.boxes[i] = p.box
                patches.append(p)
    # Flagella are drawn (set) first; cell bodies are then added on top (densities add up).
    for p in patches:
        if p.tails:
            draw_tails(nuc, cyto, p.tails, X0, Y0)
    for p in patches:
        _add_patch(nuc, p.nuc, p.x0 - X0, p.y0 - Y0)
        _add_patch(cyto, p.cyto, p.x0 - X0, p.y0 - Y0)
    od = cv2.merge([nuc, cyto])
    if style.blur_sigma > 0:
        od = cv2.GaussianBlur(od, (0, 0), style.blur_sigma)
    return od[m : m + h, m : m + w, 0], od[m : m + h, m : m + w, 1]


def od_to_rgb(nuc: np.ndarray, cyto: np.ndarray, style: Style, illumination: np.ndarray | None = None) -> np.ndarray:
    """Transmitted light through the two stains: float32 RGB (0..255) before noise.

    ``I_c = background_c * illumination * exp(-(nuc * n_c + cyto * e_c))`` evaluated as one affine transform of
    (nuc, cyto[, log illumination]) followed by one exp.
    """
    cols = [-style.od_nuc, -style.od_cyto]
    planes = [nuc, cyto]
    if illumination is not None:
        cols.append(np.ones(3, np.float32))
        planes.append(cv2.log(np.maximum(illumination, 1e-6)))
    cols.append(np.log(style.background.astype(np.float64)))
    matrix = np.stack(cols, axis=1).astype(np.float32)  # [3 RGB, inputs + offset]
    return cv2.exp(cv2.transform(cv2.merge(planes), matrix))


def illumination_map(style: Style, h: int, w: int) -> np.ndarray:
    """Camera-side uneven illumination: radial vignetting times a linear gradient."""
    ys = (np.arange(h, dtype=np.float32) - (h - 1) / 2) / (max(h, w) / 2)
    xs = (np.arange(w, dtype=np.float32) - (w - 1) / 2) / (max(h, w) / 2)
    r2 = ys[:, None] ** 2 + xs[None, :] ** 2
    gx, gy = style.gradient
    return ((1.0 - style.vignette * r2 / 2.0) * (1.0 + gx * xs[None, :] + gy * ys[:, None])).astype(np.float32)


def to_uint8(rgb: np.ndarray, noise: np.ndarray | None, sigma: float) -> np.ndarray:
    """Add camera noise (a pre-made unit-variance field) and quantise to uint8 (rounding, saturating)."""
    if noise is not None and sigma > 0:
        rgb = cv2.scaleAdd(noise, float(sigma), rgb)
    else:
        rgb = rgb.copy()
    np.clip(rgb, -0.5, 254.5, out=rgb)
    rgb += 0.5
    return rgb.astype(np.uint8)


def window_annotations(
    scenes: list[Scene], x0: int, y0: int, w: int, h: int, min_visible: float = 0.45
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (clipped to the window, window coordinates) and labels of cells visible in the window.

    A cell cut by the window border is kept when at least ``min_visible`` of its box area is inside.
    """
    all_b, all_l = [], []
    for sc in scenes:
        b = sc.boxes
        ok = ~np.isnan(b[:, 0])
        if not ok.any():
            continue
        b, lab = b[ok], sc.cls[ok]
        cb = np.stack(
            [
                np.clip(b[:, 0] - x0, 0, w),
                np.clip(b[:, 1] - y0, 0, h),
                np.clip(b[:, 2] - x0, 0, w),
                np.clip(b[:, 3] - y0, 0, h),
            ],
            1,
        )
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        vis = (cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1])
        keep = (vis >= min_visible * area) & (cb[:, 2] - cb[:, 0] >= 2) & (cb[:, 3] - cb[:, 1] >= 2)
        all_b.append(cb[keep])
        all_l.append(lab[keep])
    if not all_b:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(all_b).astype(np.float32), np.concatenate(all_l).astype(np.int64)
