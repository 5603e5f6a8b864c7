"""Draw detections, morphology flags, counts, FPS/latency and a plain-words status banner on a frame.

Fast by construction: boxes are ``cv2.rectangle`` calls on the frame in place, and every piece of text
(scores, counts, badges) is rendered once with ``cv2.putText`` into a cached mask and then blitted with
NumPy (``putText`` itself costs ~0.1 ms a call, too slow for 300 labels a frame).

Morphology results (``morphology`` argument of :func:`annotate`, also stored by the session recorder)
are a list of dicts, one per judged sperm detection, ``det`` being the row in ``detections``::

    {"det": 3, "part": "head", "score": 0.82, "abnormal": True}            # one part
    {"det": 3, "parts": {"head": {"score": 0.82, "abnormal": True}, ...}}   # several parts
    {"det": 3, "status": "n/a"}                                             # not judged (N/A badge)
    {"det": 4, "status": "pending"}                                         # queued for a later frame (N/A)

(``index``, ``det_index`` or ``detection`` are accepted for ``det``.)

``overlay`` keys (all optional): ``fps`` (float), ``latency_ms`` (float, or dict stage -> ms),
``counts`` (dict class -> count; computed from the detections when absent), ``status`` (amber banner),
``error`` (red banner, wins over status), ``title`` (str), ``frame`` (int), ``detect_every`` (int: the
detector runs on every Nth frame, the boxes in between are carried with the stage; shown when above 1;
``"async"``: the detector runs in the background, shown with ``boxes_age_ms``, how old the boxes' frame is).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from smearsight.catalog import TPS_CLASSES, class_color
from smearsight.plaintext import plain_text

_RED = (235, 40, 40)
_GREEN = (60, 220, 90)
_GREY = (170, 170, 170)
_WHITE = (255, 255, 255)
_AMBER = (230, 150, 20)


def plain_ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only: dashes, quotes and symbols mapped, accents dropped, the rest '?'."""
    return plain_text(text, 128)


class _TextCache:
    """Text rendered once into a boolean mask, then blitted in any colour.

    Least recently used masks go first beyond ``limit`` masks or ``max_bytes`` of them: the FPS/latency line
    is new text on every frame, and its masks filled the cache (about 80 MB at 768x1024, 1 GB at 2160x3840)."""

    def __init__(self, limit: int = 4096, max_bytes: int = 16 << 20) -> None:
        self._cache: OrderedDict[tuple[str, float, int], tuple[np.ndarray, int]] = OrderedDict()
        self._limit = limit
        self._max_bytes = max_bytes
        self.nbytes = 0

    def get(self, text: str, scale: float, thickness: int) -> tuple[np.ndarray, int]:
        key = (text, scale, thickness)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        import cv2

        (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        canvas = np.zeros((h + base + 2, w + 2), np.uint8)
        cv2.putText(canvas, text, (1, h + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_8)
        mask = canvas > 127
        self._cache[key] = (mask, h + 1)
        self.nbytes += mask.nbytes
        while len(self._cache) > 1 and (len(self._cache) > self._limit or self.nbytes > self._max_bytes):
            old, _ = self._cache.popitem(last=False)[1]
            self.nbytes -= old.nbytes
        return mask, h + 1

    def draw(
        self, img: np.ndarray, text: str, x: int, y: int, color: Sequence[int], scale: float, thickness: int = 1
    ) -> tuple[int, int]:
        """Draw ``text`` with its top-left corner at (x, y), clipped to the image; return (width, height)."""
        mask, _ = self.get(text, scale, thickness)
        mh, mw = mask.shape
        H, W = img.shape[:2]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + mw, W), min(y + mh, H)
        if x1 > x0 and y1 > y0:
            sub = mask[y0 - y : y1 - y, x0 - x : x1 - x]
            img[y0:y1, x0:x1][sub] = color
        return mw, mh


_TEXT = _TextCache()


def _rgb(bgr: tuple[int, int, int]) -> tuple[int, int, int]:
    return (bgr[2], bgr[1], bgr[0])


def _display_name(name: str) -> str:
    for cell in TPS_CLASSES:
        if cell.name == name:
            return cell.display
    return name


Flag = tuple[str, float | None, bool | None]


def morphology_flags(morphology: Iterable[dict[str, Any]] | None) -> dict[int, list[Flag]]:
    """Normalise morphology results to {detection row: [(part, score or None, abnormal or None), ...]}.

    A part with ``abnormal`` None means "not judged" (N/A). Malformed entries are ignored.
    """
    out: dict[int, list[Flag]] = {}
    for item in morphology or ():
        if not isinstance(item, dict):
            continue
        det = next((item[k] for k in ("det", "index", "det_index", "detection") if k in item), None)
        try:
            det = int(det)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if str(item.get("status", "")).lower() in ("n/a", "na", "none", "skipped", "pending"):
            out.setdefault(det, []).append((str(item.get("part", "")), None, None))
            continue
        parts = item.get("parts")
        if isinstance(parts, dict):
            entries = [(str(p), v) for p, v in parts.items() if isinstance(v, dict)]
        else:
            entries = [(str(item.get("part", "")), item)]
        for part, v in entries:
            score = v.get("score")
            abnormal = v.get("abnormal")
            try:
                score = None if score is None else float(score)
            except (TypeError, ValueError):
                continue  # a malformed part entry is ignored, like a malformed item
            out.setdefault(det, []).append((part, score, None if abnormal is None else bool(abnormal)))
    return out


def sperm_tally(flags: dict[int, list[Flag]]) -> tuple[int, int]:
    """(abnormal, judged) sperm among :func:`morphology_flags` results: abnormal = any part flagged;
    judged = at least one part judged (a sperm still pending or N/A on every part is not counted)."""
    abnormal = sum(1 for fl in flags.values() if any(a for _, _, a in fl))
    judged = sum(1 for fl in flags.values() if any(a is not None for _, _, a in fl))
    return abnormal, judged


def count_classes(detections: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    """Per-class counts of the valid rows (class >= 0) of a ``[K, 6]`` detection array."""
    dets = np.asarray(detections)
    counts = {name: 0 for name in class_names}
    if dets.size == 0:
        return counts
    cls = dets[:, 5].astype(np.int64)
    valid = cls >= 0
    hist = np.bincount(cls[valid], minlength=len(class_names))
    for i, name in enumerate(class_names):
        counts[name] = int(hist[i])
    return counts


def _latency_text(latency: Any) -> str:
    if isinstance(latency, dict):
        parts = [f"{k} {float(v):.1f}" for k, v in latency.items() if v is not None]
        return ("latency " + " / ".join(parts) + " ms") if parts else ""
    if latency is None:
        return ""
    return f"latency {float(latency):.0f} ms"


def annotate(
    image_rgb: np.ndarray,
    detections: np.ndarray,
    class_names: Sequence[str],
    morphology: list[dict[str, Any]] | None,
    overlay: dict[str, Any],
    *,
    inplace: bool = True,
    show_scores: bool = True,
) -> np.ndarray:
    """Annotate an RGB uint8 frame (in place unless ``inplace=False``, or the array is a non-contiguous
    or read-only view, which is copied) and return the annotated array.

    ``detections`` is ``[K, 6]`` (x1, y1, x2, y2, score, class) in frame pixels; rows with class -1 are
    unused. See the module docstring for ``morphology`` and ``overlay``.
    """
    import cv2

    img = image_rgb if inplace else image_rgb.copy()
    if not (img.flags.c_contiguous and img.flags.writeable) or img.dtype != np.uint8:
        img = np.ascontiguousarray(img, dtype=np.uint8)  # OpenCV draws on contiguous uint8 only
    H, W = img.shape[:2]
    unit = max(W, H) / 1024.0
    small = round(0.35 * unit, 2)
    thick = 1 if unit < 1.5 else 2
    dets = np.asarray(detections, dtype=np.float32).reshape(-1, 6)
    valid = dets[:, 5] >= 0
    rows = np.flatnonzero(valid)
    colors = [_rgb(class_color(n, i)) for i, n in enumerate(class_names)]
    flags = morphology_flags(morphology)

    boxes = np.round(dets[rows, :4]).astype(np.int32)
    np.clip(boxes[:, 0::2], 0, W - 1, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, H - 1, out=boxes[:, 1::2])
    classes = dets[rows, 5].astype(np.int64)
    scores = np.round(dets[rows, 4] * 100).astype(np.int64)
    for r, (x1, y1, x2, y2), c, s in zip(rows.tolist(), boxes.tolist(), classes.tolist(), scores.tolist(),
                                         strict=True):
        color = colors[c] if 0 <= c < len(colors) else _WHITE
        cv2.rectangle(img, (x1, y1), (x2, y2), color, thick, cv2.LINE_8)
        if show_scores:
            _TEXT.draw(img, f"{s / 100:.2f}", x1, y1 - int(11 * unit) - 1, color, small)
        part_flags = flags.get(r)
        if part_flags is None:
            continue
        abnormal = [p for p, _, a in part_flags if a]
        if abnormal:
            cv2.rectangle(img, (x1 - 2, y1 - 2), (x2 + 2, y2 + 2), _RED, thick, cv2.LINE_8)
            label = "abn " + ",".join(p or "?" for p in abnormal)
            _TEXT.draw(img, label, x1, y2 + 3, _RED, small)
        elif all(a is None for _, _, a in part_flags):
            _TEXT.draw(img, "N/A", x1, y2 + 3, _GREY, small)
        else:
            cv2.circle(img, (x2, y1), max(2, int(2 * unit)), _GREEN, -1, cv2.LINE_8)

    # counts panel (top left, darkened background)
    counts = overlay.get("counts")
    if counts is None:
        counts = count_classes(dets, class_names)
    lines: list[tuple[str, tuple[int, int, int]]] = []
    if overlay.get("title"):
        lines.append((plain_ascii(overlay["title"]), _WHITE))
    for i, name in enumerate(class_names):
        if name in counts:
            lines.append((f"{_display_name(name)}: {int(counts[name])}", colors[i]))
    for name, value in counts.items():
        if name not in class_names:
            lines.append((f"{plain_ascii(name)}: {value}", _WHITE))
    n_abn, n_judged = sperm_tally(flags)
    if flags:
        lines.append((f"abnormal sperm: {n_abn}/{n_judged}", _RED if n_abn else _GREEN))
    perf = []
    if overlay.get("fps") is not None:
        perf.append(f"{float(overlay['fps']):.1f} FPS")
    lat = _latency_text(overlay.get("latency_ms"))
    if lat:
        perf.append(lat)
    every = overlay.get("detect_every")
    if every == "async":
        perf.append(f"boxes {float(overlay.get('boxes_age_ms') or 0.0):.0f} ms old")
    elif int(every or 1) > 1:
        perf.append(f"detector 1/{int(every)} frames")
    if overlay.get("frame") is not None:
        perf.append(f"frame {int(overlay['frame'])}")
    if perf:
        lines.append(("  ".join(perf), _WHITE))
    scale = round(0.5 * unit, 2)
    line_h = int(20 * unit)
    pad = int(6 * unit)
    if lines:
        widths = [_TEXT.get(text, scale, thick)[0].shape[1] for text, _ in lines]
        pw, ph = min(W, max(widths) + 2 * pad), min(H, len(lines) * line_h + 2 * pad)
        message = overlay.get("error") or overlay.get("status")
        top = int(34 * unit) if message else 0
        roi = img[top : min(H, top + ph), 0:pw]
        np.right_shift(roi, 2, out=roi)
        for k, (text, color) in enumerate(lines):
            _TEXT.draw(img, text, pad, top + pad + k * line_h, color, scale, thick)

    message = overlay.get("error") or overlay.get("status")
    if message:
        banner_h = int(34 * unit)
        bg = _RED if overlay.get("error") else _AMBER
        img[:banner_h] = bg
        big = round(0.75 * unit, 2)
        _TEXT.draw(img, plain_ascii(str(message))[:160], pad, max(0, (banner_h - int(22 * unit)) // 2), _WHITE,
                   big, max(1, thick))
    return img

