"""The artifact store: finished outputs and their metadata under one fsspec URL.

A local directory by default; any fsspec URL (``s3://bucket/prefix``, ``memory://``, ...) when the
service spans machines, so every API replica can read what any worker wrote. One folder per
result: the media file (PNG/JPEG/WebP for images, MP4 or GIF for video) and ``metadata.json``.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import imageio.v2 as imageio
import numpy as np
from PIL import Image

from fastgen.request import Artifact, GenerationResult

if TYPE_CHECKING:  # the API reads artifacts without the engine (and torch)
    from fastgen.engine import Generation

MEDIA_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "mp4": "video/mp4",
    "gif": "image/gif",
}
METADATA = "metadata.json"


class ArtifactStore:
    """Writes and reads results under ``url``."""

    def __init__(self, url: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.url = url

    def save(self, generation: Generation) -> GenerationResult:
        """Encode the media, write it and the metadata; return the result with its artifacts listed."""
        result = generation.result
        start = time.perf_counter()
        artifacts = [self._put(result.id, name, data, result.output_format) for name, data in encode(generation)]
        timings = result.timings.model_copy(update={"encode_s": time.perf_counter() - start})
        result = result.model_copy(update={"artifacts": artifacts, "timings": timings})
        self._write(result.id, METADATA, result.model_dump_json(indent=2).encode())
        return result

    def load(self, result_id: str) -> GenerationResult:
        with self.fs.open(self._path(result_id, METADATA), "rb") as f:
            return GenerationResult.model_validate(json.load(f))

    def read(self, result_id: str, name: str) -> bytes:
        with self.open(result_id, name) as f:
            return f.read()

    def open(self, result_id: str, name: str):
        """A binary file object, for streaming large videos."""
        return self.fs.open(self._path(result_id, name), "rb")

    def _put(self, result_id: str, name: str, data: bytes, fmt: str) -> Artifact:
        path = self._write(result_id, name, data)
        return Artifact(name=name, url=self.fs.unstrip_protocol(path), media_type=MEDIA_TYPES[fmt], bytes=len(data))

    def _write(self, result_id: str, name: str, data: bytes) -> str:
        path = self._path(result_id, name)
        self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)
        return path

    def _path(self, result_id: str, name: str) -> str:
        if "/" in result_id or "/" in name or ".." in result_id or ".." in name:
            raise ValueError(f"invalid artifact path {result_id}/{name}")
        return f"{self.root.rstrip('/')}/{result_id}/{name}"


def encode(generation: Generation) -> list[tuple[str, bytes]]:
    """File names and bytes for a generation's media, in the request's output format."""
    fmt = generation.result.output_format
    if generation.frames:
        fps = generation.result.request.fps or 8
        return [(f"video.{fmt}", encode_video(generation.frames, fmt, fps))]
    return [(f"image_{i}.{fmt}", encode_image(image, fmt)) for i, image in enumerate(generation.images)]


def encode_image(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper())
    return buffer.getvalue()


def encode_video(frames: list[np.ndarray], fmt: str, fps: int) -> bytes:
    if fmt == "gif":
        images = [Image.fromarray(frame) for frame in frames]
        buffer = io.BytesIO()
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)
        return buffer.getvalue()
    # ffmpeg needs a seekable file for the MP4 index; h264 in yuv420p is what browsers and phones play.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        imageio.mimwrite(
            path,
            frames,
            format="FFMPEG",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=16,
            quality=8,
        )
        return path.read_bytes()
