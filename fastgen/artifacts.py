"""The artifact store: finished outputs and their metadata under one fsspec URL.

A local directory by default; any fsspec URL (``s3://bucket/prefix``, ``memory://``, ...) when the
service spans machines, so every API replica can read what any worker wrote. One folder per
result: the media file (PNG/JPEG/WebP for images, MP4 or GIF for video) and ``metadata.json``.
"""

from __future__ import annotations

import hashlib
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

from fastgen.errors import FastgenError
from fastgen.schema import Artifact, GenerationResult

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
CHUNK_BYTES = 1 << 16


class ArtifactGone(FastgenError):
    """A result's file is missing from the artifact store or is not the file that was stored."""


class ArtifactStore:
    """Writes and reads results under ``url``."""

    def __init__(self, url: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.url = url

    def save(self, generation: Generation) -> GenerationResult:
        """Encode the media, write it and the metadata; return the result with its artifacts listed."""
        result = generation.result
        start = time.perf_counter()
        seeds = [None] if generation.frames else result.seeds or [result.seed]
        artifacts = [
            self._put(result.id, name, data, result.output_format, seed)
            for (name, data), seed in zip(encode(generation), seeds, strict=True)
        ]
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

    def verify(self, result_id: str, artifact: Artifact) -> None:
        """Raise ArtifactGone unless the stored file is the one the result recorded (size, then SHA-256).

        Checked before a response starts, so a missing, truncated, grown or replaced file is a clear error and
        never a 200 whose body breaks off or is not the picture. Results stored before checksums have only sizes.
        """
        digest, size = hashlib.sha256(), 0
        try:
            with self.open(result_id, artifact.name) as f:
                while chunk := f.read(CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise ArtifactGone(f"{artifact.name} of job {result_id} is no longer in the artifact store") from None
        if size != artifact.bytes or (artifact.sha256 and digest.hexdigest() != artifact.sha256):
            raise ArtifactGone(
                f"{artifact.name} of job {result_id} is damaged in the artifact store ({size} bytes found, "
                f"{artifact.bytes} stored{', or its SHA-256 differs' if size == artifact.bytes else ''})"
            )

    def _put(self, result_id: str, name: str, data: bytes, fmt: str, seed: int | None) -> Artifact:
        path = self._write(result_id, name, data)
        return Artifact(
            name=name,
            url=self.fs.unstrip_protocol(path),
            media_type=MEDIA_TYPES[fmt],
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            seed=seed,
        )

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
