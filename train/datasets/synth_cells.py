"""Drawing of single cells for the synthetic smears (NumPy + OpenCV only; no torch).

Every cell is drawn into a small patch of *optical density* (OD) for two stains: a nuclear stain
(haematoxylin/methylene-blue-like) and a cytoplasmic stain (eosin-like). Patches are added into a canvas,
so overlapping cells darken each other as stained material does in transmitted light. Shapes are analytic
fields (signed-distance approximations with a one-pixel anti-aliasing ramp) evaluated on the patch grid;
thin structures (midpiece, tail) are OpenCV polylines.

The returned box is exact for the drawn raster: the tight pixel box of the pixels whose coverage of the
box-defining parts reaches 0.5. For sperm (mature, immature) and elongated spermatids the box covers the
HEAD only (plus the cytoplasmic droplet of immature sperm, and the attached cytoplasm lobe of elongated
spermatids) and never the tail; for the other classes it covers the whole cell including its cytoplasm.

Each cell's random parameters come from a row of uniforms drawn when the scene is made, so a cell looks
the same in every window or tile that shows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from smearsight.catalog import TPS_CLASSES

# Class indices, in the order of smearsight.catalog.TPS_CLASSES.
SERTOLI, SPERMATOCYTE, ROUND_SPERMATID, ELONGATED_SPERMATID, IMMATURE_SPERM, MATURE_SPERM = range(6)
N_UNIFORMS = 25
_SHIFT = 4
_ONE = 1 << _SHIFT


@dataclass
class CellPatch:
    """A drawn cell: patch origin (global pixel), nuclear and cytoplasmic OD patches, global box or None.

    Flagella are not in the patches: they are polylines (``tails``) drawn into the canvas first.
    """

    x0: int
    y0: int
    nuc: np.ndarray
    cyto: np.ndarray
    box: tuple[float, float, float, float] | None
    tails: list[tuple] = field(default_factory=list)  # (points [K,2] global, nuc OD, cyto OD, thickness)


def _cov_ellipse(U: np.ndarray, V: np.ndarray, a: float, b: np.ndarray | float) -> np.ndarray:
    """Coverage in [0, 1] of an ellipse with semi-axes a (along U) and b (along V), 1-px soft edge."""
    ua = U / a
    vb = V / b
    f = ua * ua
    f += vb * vb
    f -= 1.0
    ua /= a
    vb /= b
    ua *= ua
    vb *= vb
    ua += vb
    np.sqrt(ua, out=ua)
    ua *= -2.0
    ua -= 1e-6
    f /= ua  # = -F / |grad F|, the signed distance inside (positive) in pixels
    f += 0.5
    return _clip01(f)


def _clip01(x: np.ndarray) -> np.ndarray:
    np.maximum(x, 0.0, out=x)
    return np.minimum(x, 1.0, out=x)


_T40 = np.linspace(0.0, 2.0 * np.pi, 40, endpoint=False)
_COS40, _SIN40 = np.cos(_T40), np.sin(_T40)
_T72 = np.linspace(0.0, 2.0 * np.pi, 72, endpoint=False)
_COS72, _SIN72 = np.cos(_T72), np.sin(_T72)


def _fit(points_uv: np.ndarray, ang: float, size: float, max_side: float) -> float:
    """Scale so that the rotated box's geometric mean side is ``size`` and its longer side <= ``max_side``."""
    c, s = math.cos(ang), math.sin(ang)
    ex = float(np.ptp(points_uv[:, 0] * c - points_uv[:, 1] * s))
    ey = float(np.ptp(points_uv[:, 0] * s + points_uv[:, 1] * c))
    return min(size / math.sqrt(ex * ey), max_side / max(ex, ey))


def _box_of(mask_cov: np.ndarray, gx0: int, gy0: int) -> tuple[float, float, float, float] | None:
    on = mask_cov >= 0.5
    rows = np.flatnonzero(on.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(on.any(axis=0))
    return float(gx0 + cols[0]), float(gy0 + rows[0]), float(gx0 + cols[-1] + 1), float(gy0 + rows[-1] + 1)


class _Grid:
    """Rotated local coordinates (U along the cell axis, V across) on a window around the cell centre."""

    def __init__(self, cx: float, cy: float, ang: float, radius: float, coords: bool = True):
        r = int(math.ceil(radius)) + 2
        self.x0 = int(math.floor(cx)) - r
        self.y0 = int(math.floor(cy)) - r
        n = 2 * r + 1
        self.n = n
        if not coords:
            return
        xs = (self.x0 + np.arange(n, dtype=np.float32) + 0.5) - np.float32(cx)
        ys = (self.y0 + np.arange(n, dtype=np.float32) + 0.5) - np.float32(cy)
        c, s = np.float32(math.cos(ang)), np.float32(math.sin(ang))
        self.U = xs[None, :] * c + ys[:, None] * s
        self.V = -xs[None, :] * s + ys[:, None] * c


def _tail_points(start: np.ndarray, heading: float, length: float, u: np.ndarray) -> np.ndarray:
    """A thin, gently curving flagellum: points every ~2 px from ``start`` along ``heading``."""
    n = max(3, int(length / 2.0))
    steps = np.arange(n, dtype=np.float64)
    curve = (u[0] - 0.5) * 0.06
    amp = 0.15 + 0.35 * u[1]
    freq = 0.15 + 0.25 * u[2]
    phi = heading + curve * steps + amp * np.sin(freq * steps + 6.28 * u[3]) * np.minimum(1.0, steps / 6.0)
    dx = np.cos(phi) * 2.0
    dy = np.sin(phi) * 2.0
    pts = np.empty((n + 1, 2))
    pts[0] = start
    pts[1:, 0] = start[0] + np.cumsum(dx)
    pts[1:, 1] = start[1] + np.cumsum(dy)
    return pts


def _poly(img: np.ndarray, pts: np.ndarray, ox: int, oy: int, value: float, thickness: int) -> None:
    p = np.round((pts - np.array([ox, oy])) * _ONE).astype(np.int32)
    cv2.polylines(img, [p], False, float(value), thickness, cv2.LINE_8, _SHIFT)


def _assemble(
    grid: _Grid, nuc_core: np.ndarray, cyto_core: np.ndarray, box_cov: np.ndarray, tails: list[tuple]
) -> CellPatch:
    return CellPatch(grid.x0, grid.y0, nuc_core, cyto_core, _box_of(box_cov, grid.x0, grid.y0), tails)


def draw_tails(nuc: np.ndarray, cyto: np.ndarray, tails: list[tuple], ox: int, oy: int) -> None:
    """Draw flagella (global points) straight into canvases whose top-left is global (ox, oy)."""
    for pts, vn, vc, th in tails:
        if vn > 0:
            _poly(nuc, pts, ox, oy, vn, th)
        if vc > 0:
            _poly(cyto, pts, ox, oy, vc, th)


_TEX_MAX = 160  # largest patch that takes texture; offsets never depend on the patch size


def _tex(bank: np.ndarray, n: int, u1: float, u2: float) -> np.ndarray:
    h, w = bank.shape
    oy = int(u1 * (h - _TEX_MAX - 1))
    ox = int(u2 * (w - _TEX_MAX - 1))
    return bank[oy : oy + n, ox : ox + n]


def draw_cell(
    cls: int,
    cx: float,
    cy: float,
    size: float,
    ang: float,
    u: np.ndarray,
    textures: dict[str, np.ndarray],
    dens: float = 1.0,
) -> CellPatch:
    """Draw one cell of class ``cls``, axis at ``ang`` rad.

    The box's geometric mean side ``sqrt(w*h)`` is about ``size`` px, and its longer side at most the
    catalog's upper size limit (less a rasterisation margin).
    """
    if cls != SERTOLI:
        return draw_cells(cls, [cx], [cy], [size], [ang], np.asarray(u)[None], textures, dens)[0]
    dens = dens * (0.82 + 0.36 * float(u[24]))  # cell-to-cell variation of stain uptake
    # Margin for rasterisation: OpenCV polygons are up to ~2 px larger than the outline.
    return _sertoli(cx, cy, size, ang, u, textures, dens, TPS_CLASSES[cls].size_px[1] - 2.5)


def _radial(u: np.ndarray, base: int, count: int, amp: float) -> list[tuple[int, float, float]]:
    return [
        (k, amp * (0.3 + 0.7 * u[base + 2 * i]) / (k - 1) ** 0.6, 6.28 * u[base + 2 * i + 1])
        for i, k in enumerate(range(2, 2 + count))
    ]


def _radius(phi: np.ndarray, harm: list[tuple[int, float, float]]) -> np.ndarray:
    r = np.ones_like(phi)
    for k, amp, ph in harm:
        r += amp * np.cos(k * phi + ph)
    return r


def _fill(n: int, pts_xy: np.ndarray, ox: int, oy: int) -> np.ndarray:
    mask = np.zeros((n, n), np.float32)
    p = np.round((pts_xy - np.array([ox, oy])) * _ONE).astype(np.int32)
    cv2.fillPoly(mask, [p], 1.0, cv2.LINE_8, _SHIFT)
    return mask


def _sertoli(
    cx: float,
    cy: float,
    size: float,
    ang: float,
    u: np.ndarray,
    tex: dict[str, np.ndarray],
    dens: float,
    max_side: float,
) -> CellPatch:
    harm = _radial(u, 4, 4, 0.16)  # uses u[4:12]
    elong = 0.7 + 0.25 * u[12]
    rb = 0.5 * _radius(_T72, harm)
    pts = np.stack([rb * _COS72, rb * _SIN72 * elong], 1)
    f = _fit(pts, ang, size, max_side)
    grid = _Grid(cx, cy, ang, 0.5 * f * 1.7 + 1, coords=False)
    c, s = math.cos(ang), math.sin(ang)
    rot = np.array([[c, s], [-s, c]])  # row vectors (u, v) -> (x, y)

    def to_xy(p_uv: np.ndarray) -> np.ndarray:
        return p_uv @ rot + np.array([cx, cy])

    # Polygons are rasterised at pixel centres: shift by half a pixel so coverage matches the grid.
    half = np.array([0.5, 0.5])
    cell = _fill(grid.n, to_xy(pts * f) - half, grid.x0, grid.y0)
    fine = _tex(tex["fine"], grid.n, u[13], u[14])
    cyto = cell * dens * (0.16 + 0.1 * u[15]) * (1.0 + 0.35 * fine)
    # Irregular, pale, indented nucleus with a darker rim and a prominent nucleolus.
    na, nb = f * (0.16 + 0.05 * u[16]), f * (0.11 + 0.04 * u[17])
    nu, nv = f * 0.12 * (u[18] - 0.5), f * 0.12 * (u[19] - 0.5)
    nr = _radius(_T72, [(3, 0.12 + 0.1 * u[20], 6.28 * u[21]), (2, 0.08, 6.28 * u[22])])
    npts = to_xy(np.stack([nu + na * nr * _COS72, nv + nb * nr * _SIN72], 1)) - half
    nucleus = _fill(grid.n, npts, grid.x0, grid.y0)
    rim = np.zeros_like(nucleus)
    p = np.round((npts - np.array([grid.x0, grid.y0])) * _ONE).astype(np.int32)
    cv2.polylines(rim, [p], True, 1.0, 1, cv2.LINE_8, _SHIFT)
    nl = to_xy(np.array([[nu + na * 0.15, nv]]))[0] - half
    nucleolus = np.zeros_like(nucleus)
    cv2.circle(
        nucleolus,
        (int(round((nl[0] - grid.x0) * _ONE)), int(round((nl[1] - grid.y0) * _ONE))),
        int(round((1.3 + 0.8 * u[23]) * _ONE)),
        1.0,
        -1,
        cv2.LINE_8,
        _SHIFT,
    )
    nuc = dens * (nucleus * (0.32 + 0.1 * fine) + rim * 0.2)
    nuc = np.maximum(nuc, nucleolus * dens * 1.5)
    return _assemble(grid, nuc.astype(np.float32, copy=False), cyto.astype(np.float32, copy=False), cell, [])


# ------------------------------------------------------------------------------------------------ batches
# The same cells, drawn many at a time: one class's cells share a grid size and every field is one NumPy
# operation over an [N, n, n] stack, which removes most of the per-cell interpreter overhead.


def _col(v: np.ndarray | float) -> np.ndarray:
    return np.asarray(v, np.float32).reshape(-1, 1, 1)


class _Batch:
    """Rotated local coordinates for N cells on [N, n, n] grids (each grid's origin at its own x0, y0)."""

    def __init__(self, cx: np.ndarray, cy: np.ndarray, ang: np.ndarray, radius: np.ndarray):
        r = np.ceil(radius).astype(np.int64) + 2
        self.x0 = np.floor(cx).astype(np.int64) - r
        self.y0 = np.floor(cy).astype(np.int64) - r
        self.n = n = int((2 * r + 1).max())
        ar = np.arange(n, dtype=np.float32) + np.float32(0.5)
        xs = (self.x0 - cx).astype(np.float32)[:, None] + ar  # [N, n]
        ys = (self.y0 - cy).astype(np.float32)[:, None] + ar
        c = np.cos(ang).astype(np.float32)[:, None, None]
        s = np.sin(ang).astype(np.float32)[:, None, None]
        self.U = xs[:, None, :] * c + ys[:, :, None] * s
        self.V = ys[:, :, None] * c - xs[:, None, :] * s

    def boxes(self, cov: np.ndarray) -> list[tuple[float, float, float, float] | None]:
        on = cov >= 0.5
        rows, cols = on.any(axis=2), on.any(axis=1)
        n = self.n
        y1, y2 = rows.argmax(1), n - rows[:, ::-1].argmax(1)
        x1, x2 = cols.argmax(1), n - cols[:, ::-1].argmax(1)
        present = rows.any(1)
        return [
            (float(self.x0[i] + x1[i]), float(self.y0[i] + y1[i]), float(self.x0[i] + x2[i]), float(self.y0[i] + y2[i]))
            if present[i]
            else None
            for i in range(len(present))
        ]

    def patches(self, nuc: np.ndarray, cyto: np.ndarray, box_cov: np.ndarray, tails: list[list[tuple]]) -> list:
        boxes = self.boxes(box_cov)
        nuc = nuc.astype(np.float32, copy=False)
        cyto = cyto.astype(np.float32, copy=False)
        return [
            CellPatch(int(self.x0[i]), int(self.y0[i]), nuc[i], cyto[i], boxes[i], tails[i]) for i in range(len(boxes))
        ]


def _points(uc, vc, a, b, k=0.0) -> np.ndarray:
    """[N, 40, 2] outlines of (pear-modulated) ellipses; arguments are [N] arrays or scalars."""
    uc, vc, a, b, k = (np.asarray(v, np.float64).reshape(-1, 1) for v in (uc, vc, a, b, k))
    u = uc + a * _COS40
    v = vc + b * _SIN40 * (1.0 + k * _COS40)
    u, v = np.broadcast_arrays(u, v)
    return np.stack([u, v], axis=-1)


def _fit_batch(points: np.ndarray, ang: np.ndarray, size: np.ndarray, max_side: float) -> np.ndarray:
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    pu, pv = points[..., 0], points[..., 1]
    ex = np.ptp(pu * c - pv * s, axis=1)
    ey = np.ptp(pu * s + pv * c, axis=1)
    return np.minimum(size / np.sqrt(ex * ey), max_side / np.maximum(ex, ey))


def _tex_batch(bank: np.ndarray, n: int, u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    h, w = bank.shape
    oy = (u1 * (h - _TEX_MAX - 1)).astype(np.int64)
    ox = (u2 * (w - _TEX_MAX - 1)).astype(np.int64)
    ar = np.arange(n)
    return bank[(oy[:, None] + ar)[:, :, None], (ox[:, None] + ar)[:, None, :]]


def _sperm_batch(immature, cx, cy, size, ang, u, dens, max_side) -> list[CellPatch]:
    N = len(cx)
    aspect = 1.45 + 0.4 * u[:, 4]
    a = np.full(N, 0.5)
    b = a / aspect
    k = 0.18 * u[:, 5]
    pts = _points(0.0, 0.0, a, b, k)
    rd = np.zeros(N)
    if immature:
        rd = 0.22 + 0.08 * u[:, 6]
        dv = (u[:, 7] - 0.5) * 0.12
        du = -a - rd * (0.35 + 0.25 * u[:, 8])
        pts = np.concatenate([pts, _points(du, dv, rd, rd)], axis=1)
    f = _fit_batch(pts, ang, size, max_side)
    a, b = a * f, b * f
    g = _Batch(cx, cy, ang, a + 2 * rd * f + 1)
    U, V = g.U, g.V
    A, B, K = _col(a), _col(b), _col(k)
    bw = B * (1.0 + K * np.clip(U / A, -1.0, 1.0))
    head = _cov_ellipse(U, V, A, bw)
    d_head = _col(dens * ((1.25 + 0.5 * u[:, 9]) if immature else (1.55 + 0.55 * u[:, 9])))
    front = _clip01(U - A * _col(-0.15 + 0.25 * u[:, 10]) + 0.5)
    acro = 0.35 if not immature else 0.55
    nuc = head * d_head * (1.0 - (1.0 - acro) * front)
    cyto = head * (0.25 + 0.25 * front)
    box_cov = head
    if immature:
        R = _col(rd * f)
        drop = _cov_ellipse(U - _col(du * f), V - _col(dv * f), R, R)
        nuc = np.maximum(nuc, drop * _col(dens * (0.25 + 0.15 * u[:, 11])))
        cyto = np.maximum(cyto, drop * _col(dens * (1.3 + 0.5 * u[:, 12])))
        box_cov = np.maximum(head, drop)
        neck_u = du * f - rd * f * 0.8
    else:
        neck_u = -a
    tails = []
    for i in range(N):
        c, s = math.cos(ang[i]), math.sin(ang[i])
        start = np.array([cx[i] + neck_u[i] * c, cy[i] + neck_u[i] * s])
        length = size[i] * (4.0 + 4.0 * u[i, 13])
        tail = _tail_points(start, ang[i] + math.pi + (u[i, 14] - 0.5) * 0.5, length, u[i, 15:19])
        n_mid = max(2, int(size[i] * (0.45 + 0.2 * u[i, 19]) / 2.0))
        tails.append(
            [
                (tail, dens[i] * (0.3 + 0.2 * u[i, 20]), dens[i] * 0.22, 1),
                (tail[: n_mid + 1], dens[i] * 0.45, dens[i] * 0.75, 2),
            ]
        )
    return g.patches(nuc, cyto, box_cov, tails)


def _elongated_batch(cx, cy, size, ang, u, dens, max_side) -> list[CellPatch]:
    N = len(cx)
    aspect = 2.7 + 1.1 * u[:, 4]
    a = np.full(N, 0.5)
    b = a / aspect
    kappa = (u[:, 5] - 0.5) * 0.5
    cu, cv = -(0.2 + 0.25 * u[:, 6]), (u[:, 7] - 0.5) * 0.3
    ca, cb = 0.36 + 0.14 * u[:, 8], 0.28 + 0.1 * u[:, 9]
    nu = a[:, None] * _COS40
    nv = b[:, None] * _SIN40 + kappa[:, None] * _COS40**2 * a[:, None]
    pts = np.concatenate([np.stack([nu, nv], -1), _points(cu, cv, ca, cb)], axis=1)
    f = _fit_batch(pts, ang, size, max_side)
    a, b, kappa = a * f, b * f, kappa * f
    g = _Batch(cx, cy, ang, np.maximum(a, (np.abs(cu) + ca) * f) + 1)
    U, V = g.U, g.V
    A = _col(a)
    nucleus = _cov_ellipse(U, V - _col(kappa) * (U / A) ** 2, A, _col(b))
    lobe = _cov_ellipse(U - _col(cu * f), V - _col(cv * f), _col(ca * f), _col(cb * f))
    D = _col(dens)
    nuc = np.maximum(nucleus * D * _col(1.7 + 0.5 * u[:, 10]), lobe * D * 0.12)
    cyto = np.maximum(lobe * D * _col(0.95 + 0.4 * u[:, 11]), nucleus * 0.3)
    box_cov = np.maximum(nucleus, lobe)
    tails: list[list[tuple]] = []
    for i in range(N):
        if u[i, 12] < 0.4:
            c, s = math.cos(ang[i]), math.sin(ang[i])
            off = (cu[i] - ca[i] * 0.7) * f[i]
            start = np.array([cx[i] + off * c, cy[i] + off * s])
            tail = _tail_points(start, ang[i] + math.pi, size[i] * (1.0 + 2.0 * u[i, 13]), u[i, 14:18])
            tails.append([(tail, dens[i] * 0.22, dens[i] * 0.2, 1)])
        else:
            tails.append([])
    return g.patches(nuc, cyto, box_cov, tails)


def _round_batch(cx, cy, size, ang, u, max_side) -> tuple[np.ndarray, _Batch, np.ndarray]:
    """Semi-axis a, the cells' grids and the whole-cell coverage of nearly round cells."""
    ecc = 0.88 + 0.12 * u[:, 4]
    f = _fit_batch(_points(0.0, 0.0, 0.5, 0.5 * ecc), ang, size, max_side)
    a, b = 0.5 * f, 0.5 * ecc * f
    g = _Batch(cx, cy, ang, a + 1)
    return a, g, _cov_ellipse(g.U, g.V, _col(a), _col(b))


def _round_spermatid_batch(cx, cy, size, ang, u, tex, dens, max_side) -> list[CellPatch]:
    N = len(cx)
    a, g, cell = _round_batch(cx, cy, size, ang, u, max_side)
    U, V = g.U, g.V
    rn = a * (0.58 + 0.1 * u[:, 5])
    off = a * 0.12 * u[:, 6]
    Un = U - _col(off * np.cos(6.28 * u[:, 7]))
    Vn = V - _col(off * np.sin(6.28 * u[:, 7]))
    RN = _col(rn)
    nucleus = _cov_ellipse(Un, Vn, RN, RN)
    fine = _tex_batch(tex["fine"], g.n, u[:, 8], u[:, 9])
    D = _col(dens)
    nuc = nucleus * D * _col(0.65 + 0.3 * u[:, 10]) * (1.0 + 0.15 * fine)
    psi = 6.28 * u[:, 11]
    direction = (Un * _col(np.cos(psi)) + Vn * _col(np.sin(psi))) / (np.sqrt(Un * Un + Vn * Vn) + 1e-3)
    RC = RN + _col(1.6 + 0.9 * u[:, 12])
    ring = _cov_ellipse(Un, Vn, RC, RC) - nucleus
    cap = ring * np.clip((direction - _col(0.25 + 0.25 * u[:, 13])) * 3.0, 0.0, 1.0)
    granule = _cov_ellipse(Un - _col((rn - 0.3) * np.cos(psi)), Vn - _col((rn - 0.3) * np.sin(psi)), 1.1, 1.1)
    nuc = np.maximum(nuc + cap * D * 0.35, granule * D * 1.6)
    cyto = cell * D * _col(0.45 + 0.25 * u[:, 14]) + cap * D * 1.3
    return g.patches(nuc, cyto, cell, [[] for _ in range(N)])


def _spermatocyte_batch(cx, cy, size, ang, u, tex, dens, max_side) -> list[CellPatch]:
    N = len(cx)
    a, g, cell = _round_batch(cx, cy, size, ang, u, max_side)
    U, V = g.U, g.V
    rn = _col(a * (0.72 + 0.1 * u[:, 5]))
    off = a * 0.1 * u[:, 6]
    nucleus = _cov_ellipse(U - _col(off * np.cos(6.28 * u[:, 7])), V - _col(off * np.sin(6.28 * u[:, 7])), rn, rn)
    thread = _tex_batch(tex["thread"], g.n, u[:, 8], u[:, 9])
    threads = np.exp(-((thread / _col(0.35 + 0.25 * u[:, 10])) ** 2))
    D = _col(dens)
    nuc = nucleus * D * (_col(0.3 + 0.15 * u[:, 11]) + _col(0.8 + 0.5 * u[:, 12]) * threads)
    cyto = cell * D * _col(0.28 + 0.15 * u[:, 13])
    return g.patches(nuc, cyto, cell, [[] for _ in range(N)])


def draw_cells(
    cls: int,
    cx: np.ndarray,
    cy: np.ndarray,
    size: np.ndarray,
    ang: np.ndarray,
    u: np.ndarray,
    textures: dict[str, np.ndarray],
    dens: float = 1.0,
) -> list[CellPatch]:
    """Draw many cells of one class at once; the same result as :func:`draw_cell` for each of them."""
    cx, cy, size, ang = (np.asarray(v, np.float64).reshape(-1) for v in (cx, cy, size, ang))
    if len(cx) == 0:
        return []
    u = np.asarray(u, np.float64).reshape(len(cx), -1)
    if cls == SERTOLI:
        return [draw_cell(cls, cx[i], cy[i], size[i], ang[i], u[i], textures, dens) for i in range(len(cx))]
    d = dens * (0.82 + 0.36 * u[:, 24])
    max_side = TPS_CLASSES[cls].size_px[1] - 0.8
    if cls in (MATURE_SPERM, IMMATURE_SPERM):
        return _sperm_batch(cls == IMMATURE_SPERM, cx, cy, size, ang, u, d, max_side)
    if cls == ELONGATED_SPERMATID:
        return _elongated_batch(cx, cy, size, ang, u, d, max_side)
    if cls == ROUND_SPERMATID:
        return _round_spermatid_batch(cx, cy, size, ang, u, textures, d, max_side)
    return _spermatocyte_batch(cx, cy, size, ang, u, textures, d, max_side)
