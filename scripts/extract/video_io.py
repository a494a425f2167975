"""PyAV decoding into per-row frames: one row per ``interval`` seconds (data.md §1.2 grid).

Row ``t`` covers ``[t*fi, (t+1)*fi)`` of the video, time 0 being the first decoded frame (a
stream whose timestamps start later is shifted). Rows exist while their window starts inside
the video: ``rows = ceil(duration / fi)``, ``duration`` = last frame time + one frame period.
Each row asks for frames at target times (ResNet: the window start; SlowFast: the centres of
32 equal slots of the window) and gets the decoded frame **nearest** to each target (ties go
to the earlier frame; targets past the end get the last frame). Decoding streams: a video is
never held in memory whole, rows are yielded in chunks as soon as their frames are known.
Frames are resized (shorter side) and centre-cropped once, as uint8 RGB; normalisation is
left to the networks, on the device.
"""
from __future__ import annotations

import math
import time
from collections import deque
from fractions import Fraction

import av
import numpy as np

from scripts.extract.recipe import (
    FRAME_SIZE,
    RESIZE_INTERPOLATION,
    RESNET_FRAME_OFFSET,
    ROW_START_TOLERANCE_S,
    SLOWFAST_FAST_FRAMES,
)


def count_rows(duration: float, interval: float) -> int:
    """Rows whose window starts inside a video of ``duration`` seconds (tolerance: recipe)."""
    if duration <= ROW_START_TOLERANCE_S:
        return 0
    return math.ceil((duration - ROW_START_TOLERANCE_S) / interval)


def row_targets(row: int, interval: float, streams) -> list:
    """``[(time, stream, slot)]`` of one row, in time order."""
    start = row * interval
    targets = []
    if "resnet" in streams:
        targets.append((start + RESNET_FRAME_OFFSET * interval, "resnet", 0))
    if "slowfast" in streams:
        step = interval / SLOWFAST_FAST_FRAMES
        targets += [(start + (k + 0.5) * step, "slowfast", k)
                    for k in range(SLOWFAST_FAST_FRAMES)]
    return sorted(targets, key=lambda t: t[0])


class Frame:
    """A decoded frame, converted to a ``(size, size, 3)`` uint8 crop on first use only."""

    def __init__(self, time_s: float, frame: av.VideoFrame, size: int):
        self.time, self._frame, self._size, self._image = time_s, frame, size, None

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            self._image = resize_crop(self._frame, self._size)
            self._frame = None
        return self._image


def resize_crop(frame: av.VideoFrame, size: int) -> np.ndarray:
    """Shorter side to ``size`` (swscale, aspect kept), then the centre ``size x size`` crop."""
    scale = size / min(frame.width, frame.height)
    width = max(size, round(frame.width * scale))
    height = max(size, round(frame.height * scale))
    rgb = frame.reformat(width=width, height=height, format="rgb24",
                         interpolation=RESIZE_INTERPOLATION).to_ndarray()
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(rgb[top:top + size, left:left + size])


class RowSampler:
    """Assigns a stream of ``Frame`` objects (increasing time) to the rows' target times."""

    def __init__(self, interval: float, streams):
        self.interval, self.streams = interval, tuple(streams)
        self.pending = deque()  # (time, row, stream, slot), time-ordered across rows
        self.rows = {}          # row -> [{"resnet": Frame, "slowfast": [Frame]}, n_left]
        self.next_row = 0
        self.prev = None

    def _add_row(self) -> None:
        row = self.next_row
        targets = row_targets(row, self.interval, self.streams)
        slots = {"slowfast": [None] * SLOWFAST_FAST_FRAMES} if "slowfast" in self.streams else {}
        self.rows[row] = [slots, len(targets)]
        self.pending.extend((t, row, stream, slot) for t, stream, slot in targets)
        self.next_row += 1

    def _assign(self, target, frame: Frame) -> None:
        _, row, stream, slot = target
        slots = self.rows[row][0]
        if stream == "slowfast":
            slots[stream][slot] = frame.image
        else:
            slots[stream] = frame.image
        self.rows[row][1] -= 1

    def _completed(self) -> list:
        done = []
        while self.rows and self.rows[min(self.rows)][1] == 0:
            done.append(self.rows.pop(min(self.rows))[0])
        return done

    def push(self, frame: Frame) -> list:
        """Feed the next frame; return the rows it completed (oldest first)."""
        while self.next_row * self.interval <= frame.time:
            self._add_row()
        while self.pending and self.pending[0][0] <= frame.time:
            target = self.pending.popleft()
            near_current = (self.prev is None
                            or frame.time - target[0] < target[0] - self.prev.time)
            self._assign(target, frame if near_current else self.prev)
        self.prev = frame
        return self._completed()

    def finish(self, duration: float) -> list:
        """End of stream: add the rows up to ``duration`` and give them the last frame."""
        if self.prev is None:
            raise ValueError("no decodable video frame")
        while self.next_row < count_rows(duration, self.interval):
            self._add_row()
        while self.pending:
            self._assign(self.pending.popleft(), self.prev)
        return self._completed()


def frame_period(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    return float(1 / Fraction(rate)) if rate else None


def decoded_frames(container, size: int):
    """Yield ``(Frame, period)`` for the first video stream; time 0 = first frame."""
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    period, t0 = frame_period(stream), None
    for index, frame in enumerate(container.decode(stream)):
        t = frame.time if frame.time is not None else index * (period or 0.0)
        t0 = t if t0 is None else t0
        yield Frame(t - t0, frame, size), period


def _pack(rows: list, streams, size: int) -> dict:
    out = {}
    if "resnet" in streams:
        out["resnet"] = (np.stack([r["resnet"] for r in rows]) if rows
                         else np.zeros((0, size, size, 3), np.uint8))
    if "slowfast" in streams:
        out["slowfast"] = (np.stack([np.stack(r["slowfast"]) for r in rows]) if rows
                           else np.zeros((0, SLOWFAST_FAST_FRAMES, size, size, 3), np.uint8))
    return out


def iter_chunks(path: str, interval: float, streams, rows_per_chunk: int,
                size: int = FRAME_SIZE):
    """Yield dicts ``{stream: uint8 array, "rows", "last", "duration", "decode_s"}``.

    ``decode_s`` is the time spent producing the chunk (decoding, resizing, packing); the last
    chunk (``last`` True, possibly empty) carries the video ``duration`` in seconds.
    """
    sampler, ready, start = RowSampler(interval, streams), [], time.perf_counter()
    last_time, period = None, None
    with av.open(path) as container:
        for frame, period in decoded_frames(container, size):
            if last_time is not None and period is None:
                period = frame.time - last_time
            last_time = frame.time
            ready += sampler.push(frame)
            while len(ready) >= rows_per_chunk:
                chunk, ready = ready[:rows_per_chunk], ready[rows_per_chunk:]
                yield dict(_pack(chunk, streams, size), rows=len(chunk), last=False,
                           duration=None, decode_s=time.perf_counter() - start)
                start = time.perf_counter()
    duration = (last_time or 0.0) + (period or 0.0)
    ready += sampler.finish(duration)
    while len(ready) > rows_per_chunk:
        chunk, ready = ready[:rows_per_chunk], ready[rows_per_chunk:]
        yield dict(_pack(chunk, streams, size), rows=len(chunk), last=False, duration=None,
                   decode_s=time.perf_counter() - start)
        start = time.perf_counter()
    yield dict(_pack(ready, streams, size), rows=len(ready), last=True, duration=duration,
               decode_s=time.perf_counter() - start)


def write_test_video(path: str, seconds: float, fps: int = 10, width: int = 64,
                     height: int = 48, codec: str = "mpeg4") -> int:
    """Encode a synthetic clip (moving coloured square on a drifting background); frame count.

    Used by the tests and the benchmark, so both run without any real video.
    """
    n_frames = round(seconds * fps)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        side = max(4, min(width, height) // 4)
        for i in range(n_frames):
            img = np.empty((height, width, 3), np.uint8)
            img[:] = ((i * 7) % 256, 80, (255 - i * 5) % 256)
            x = (i * 3) % max(1, width - side)
            y = (i * 2) % max(1, height - side)
            img[y:y + side, x:x + side] = (255, (i * 11) % 256, 0)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return n_frames
