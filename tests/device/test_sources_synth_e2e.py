"""synth:// end to end without models: the source's frames equal the slide's own frames along the stage
path; its ground-truth boxes are annotated, streamed over HTTP, saved as files and recorded, then exported."""

from __future__ import annotations

import itertools
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
synth = pytest.importorskip("smearsight.train.datasets.synth", reason="SyntheticSlide not available")

from smearsight.catalog import TPS_CLASS_NAMES  # noqa: E402
from smearsight.cli import main  # noqa: E402
from smearsight.device.record import SessionRecorder  # noqa: E402
from smearsight.device.sinks import open_sink  # noqa: E402
from smearsight.device.sources import open_source  # noqa: E402
from smearsight.runtime.annotate import annotate, count_classes  # noqa: E402

URI = "synth://?seed=5&speed=40&size=320x240&slide=1280x960"


def test_synth_frames_annotated_streamed_saved_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    slide = synth.SyntheticSlide(5, slide_size=(960, 1280), frame_size=(240, 320))
    positions = list(itertools.islice(slide.stage_path(speed_px_per_frame=40), 6))
    http = open_sink("http://127.0.0.1:0")
    files = open_sink(f"file://{tmp_path}/frames/", ext="png")
    rec = SessionRecorder(tmp_path / "s.db", batch_frames=4)
    sid = rec.start_session({"source": URI, "class_names": list(TPS_CLASS_NAMES)})
    totals = dict.fromkeys(TPS_CLASS_NAMES, 0)
    try:
        with open_source(URI) as src:
            for frame, (x, y) in zip(src, positions, strict=False):
                image, boxes, labels = slide.frame_at(x, y, with_boxes=True)
                assert np.array_equal(frame.image, image), f"frame {frame.index} is the slide at {(x, y)}"
                dets = np.zeros((len(boxes), 6), np.float32)
                dets[:, :4], dets[:, 4], dets[:, 5] = boxes, 1.0, labels
                counts = count_classes(dets, TPS_CLASS_NAMES)
                for k, v in counts.items():
                    totals[k] += v
                shown = annotate(frame.image.copy(), dets, TPS_CLASS_NAMES, None, {"fps": 10.0, "counts": counts})
                status = {"frame": frame.index, "counts": counts}
                http.write(shown, status)
                files.write(shown, status)
                assert rec.record_frame(frame.index, frame.timestamp, dets, TPS_CLASS_NAMES, None)
                if frame.index == 5:
                    break
        with urllib.request.urlopen(f"{http.url}/status.json", timeout=10) as resp:
            served = json.loads(resp.read())
        assert served.pop("age_s") >= 0 and served == json.loads(json.dumps(status))
        with urllib.request.urlopen(f"{http.url}/snapshot.jpg", timeout=10) as resp:
            snap = cv2.imdecode(np.frombuffer(resp.read(), np.uint8), cv2.IMREAD_COLOR)
        assert snap.shape == (240, 320, 3)
        assert np.abs(snap[..., ::-1].astype(int) - shown.astype(int)).mean() < 6
    finally:
        http.close()
        files.close()
    summary = rec.end_session()
    rec.close()
    assert sum(totals.values()) > 0, "the synthetic slide shows cells"
    assert summary["frames"] == 6 and summary["counts_per_class"] == totals
    saved = sorted((tmp_path / "frames").iterdir())
    assert len(saved) == 6
    assert np.array_equal(cv2.imread(str(saved[-1]))[..., ::-1], shown)
    assert main(["sessions", "export", str(sid), "--format", "json", "--db", str(tmp_path / "s.db")]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert sum(len(f["detections"]) for f in exported["frames"]) == sum(totals.values())
