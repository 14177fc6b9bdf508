"""The Gradio page over the REST API: prompt in, images and videos out, with what acceleration did.

Every service call goes through :class:`fastgen.client.FastgenClient`, so the page works against a
remote service just as well as against the one that mounts it, and it never imports torch.
Submitting returns at once; a ``gr.Timer`` polls the session's unfinished jobs and draws their
progress (step i of N, ETA); results are fetched through the client into local files that Gradio
serves, so the browser never needs the API key. The model's capabilities (``/v1/models``) decide
which controls show: frames and fps only for video models, each acceleration only where it applies.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import httpx
from fastapi import FastAPI

from fastgen.client import FastgenClient, ServiceError
from fastgen.ui.render import history_html, metadata_html, problem_html, problem_text, progress_html
from fastgen.ui.session import Job, Session

logger = logging.getLogger(__name__)
POLL_S = 0.5
UI_THREADS = 32  # handler threads, a pool apart from the API's (see mount_ui)
SERVICE_ERRORS = (ServiceError, httpx.HTTPError)


@dataclass(frozen=True)
class AccelerationControl:
    """One technique the page can switch on: the ``accelerate`` field it sets and a one-line explanation."""

    name: str
    label: str
    explanation: str
    turned_on: Any = True  # the value of ``accelerate.<name>`` when ticked


# One row per technique the service implements; a model lists in its capabilities which ones it can use.
ACCELERATIONS = (
    AccelerationControl(
        "fuse_qkv",
        "Fused Q/K/V projections",
        "One matmul instead of three for each attention's query, key and value: the same image up to rounding.",
    ),
    AccelerationControl(
        "cache",
        "Approximate cache",
        "Start from a similar earlier prompt's half-finished image and skip its first steps: faster, approximate.",
        {"enabled": True},
    ),
    AccelerationControl(
        "sparse_attention",
        "Sparse attention",
        "Each query attends to a window of nearby tokens (about 3%), rescaled to stay close to dense: DiTs only.",
        {"mode": "window"},
    ),
)

LORA_INFO = "Adapters from the service's LoRA library, all at the scale beside; swapped in without reloading."

CSS = """
.fg-progress { margin: 4px 0 8px; }
.fg-track { height: 10px; border-radius: 5px; background: var(--neutral-200); overflow: hidden; }
.fg-fill { height: 100%; background: var(--color-accent); transition: width 0.3s; }
.fg-progress[data-state="failed"] .fg-fill { background: var(--error-text-color); }
.fg-progress[data-state="cancelled"] .fg-fill { background: var(--neutral-400); }
.fg-progress-text { margin-top: 4px; font-variant-numeric: tabular-nums; }
.fg-problem { border: 1px solid var(--error-border-color); background: var(--error-background-fill);
  color: var(--error-text-color); border-radius: 6px; padding: 8px 12px; }
.fg-problem ul { margin: 4px 0 0 18px; }
.fg-meta th, .fg-history th { text-align: left; padding-right: 12px; font-weight: 600; }
.fg-meta td, .fg-history td { padding: 2px 12px 2px 0; }
.fg-history { width: 100%; font-size: 0.9em; }
"""


def theme() -> gr.themes.Base:
    """Gradio's default look with system fonts only: the page fetches nothing from outside the service."""
    return gr.themes.Default(
        font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "Consolas", "monospace")
    )


class Form(NamedTuple):
    """The form's values, in the order the page passes them to ``Page.submit``."""

    prompt: str
    negative: str
    model: str | None
    width: float | None
    height: float | None
    steps: float | None
    guidance: float | None
    seed: float | None
    random_seed: bool
    frames: float | None
    fps: float | None
    loras: tuple[str, ...] | list[str] | None = ()
    lora_scale: float | None = 1.0
    accelerate: tuple[bool, ...] = ()

    def request(self, caps: dict[str, Any]) -> dict[str, Any]:
        """The request body; blank numbers are left out so the model's defaults apply."""
        request: dict[str, Any] = {"prompt": self.prompt or "", "negative_prompt": self.negative or ""}
        request |= {"model": self.model, **_present(width=self.width, height=self.height, steps=self.steps)}
        if self.guidance is not None:
            request["guidance"] = float(self.guidance)
        request["seed"] = None if self.random_seed or self.seed is None else int(self.seed)
        if caps.get("kind") == "video":
            request |= _present(num_frames=self.frames, fps=self.fps)
        if self.loras and caps.get("loras"):
            scale = 1.0 if self.lora_scale is None else float(self.lora_scale)
            request["loras"] = [{"name": name, "scale": scale} for name in self.loras]
        chosen = {c.name: c.turned_on for c, on in zip(ACCELERATIONS, self.accelerate, strict=True) if on}
        return request | ({"accelerate": chosen} if chosen else {})


class Page:
    """The page's event handlers, over one client; each returns what the page shows."""

    def __init__(self, api_url: str, api_key: str | None = None, files_dir: Path | None = None):
        self.api_url = api_url.rstrip("/")
        self.client = FastgenClient(self.api_url, api_key=api_key)
        self.files_dir = files_dir or Path(tempfile.mkdtemp(prefix="fastgen-ui-"))

    def problem(self, exc: Exception) -> str:
        if not isinstance(exc, SERVICE_ERRORS):
            logger.exception("the page failed")
        return problem_html(*problem_text(exc, self.api_url))

    def load_models(self, session: Session) -> tuple[Session, Any, str, Any, Any]:
        """The model picker's choices, from the service's model listing, and the LoRA picker's, from its library."""
        try:
            models = self.client.models()
            loras = [entry["name"] for entry in self.client.loras() if "error" not in entry]
        except Exception as exc:
            return session, gr.update(choices=[], value=None), self.problem(exc), gr.skip(), gr.skip()
        session.models = {m["name"]: m for m in models}
        names = list(session.models)
        picked = gr.update(choices=names, value=names[0] if names else None)
        return session, picked, "", gr.update(choices=loras, value=[]), gr.update(visible=bool(loras))

    def model_controls(self, session: Session, name: str | None) -> list[Any]:
        """Defaults and visibility for the chosen model: size step, video fields, usable accelerations."""
        caps = session.models.get(name or "")
        if caps is None:
            return [gr.update()] * (9 + len(ACCELERATIONS))
        d, video = caps["defaults"], caps["kind"] == "video"
        step = caps.get("size_multiple") or 8
        frames_info = f"{caps['frame_multiple']}·k + 1" if video and caps.get("frame_multiple") else None
        usable = set(caps.get("accelerations", []))
        return [
            _describe(caps),
            gr.update(value=d["width"], step=step, info=f"a multiple of {step}"),
            gr.update(value=d["height"], step=step, info=f"a multiple of {step}"),
            gr.update(value=d["steps"]),
            gr.update(value=d["guidance"]),
            gr.update(visible=video),
            gr.update(value=d.get("num_frames"), info=frames_info),
            gr.update(value=d.get("fps") or 8),
            *(_acceleration_update(control, control.name in usable, name) for control in ACCELERATIONS),
            _lora_update(bool(caps.get("loras")), name),
        ]

    def submit(self, session: Session, *values: Any) -> list[Any]:
        """Queue the job and return at once; the timer takes over from here."""
        form = Form(*values[: len(Form._fields) - 1], accelerate=values[len(Form._fields) - 1 :])
        caps = session.models.get(form.model or "", {})
        request = form.request(caps)
        try:
            answer = self.client.submit(request)
        except Exception as exc:
            return [session, self.problem(exc), gr.skip(), gr.skip(), gr.skip(), gr.skip()]
        job = Job(answer["id"], answer["model"], caps.get("kind", "image"), form.prompt, bool(form.random_seed))
        session.add(job)
        return [session, "", progress_html(job), history_html(session.jobs), gr.update(active=True), _cancel(True)]

    def poll(self, session: Session) -> list[Any]:
        """Read every unfinished job's status; fetch the files of the ones that have succeeded."""
        try:
            ended = [job for job in session.unfinished() if job.update(self.client.status(job.id))]
            fetched = [self._fetch(job) for job in session.jobs if job.status == "succeeded" and not job.file]
        except Exception as exc:  # keep polling: the service may come back
            session.poll_failed = True
            return [session, self.problem(exc), *[gr.skip()] * 7, gr.update(active=True), gr.skip()]
        cleared = "" if session.poll_failed else gr.skip()  # a submit's own problem stays until the next submit
        session.poll_failed = False
        busy = bool(session.unfinished())
        return [
            session,
            cleared,
            progress_html(session.latest),
            history_html(session.jobs),
            *(self._results(session) if ended or fetched else [gr.skip()] * 5),
            gr.update(active=busy),
            _cancel(busy),
        ]

    def cancel(self, session: Session) -> list[Any]:
        """Ask the service to stop the newest unfinished job; it stops at its next step."""
        job = next(iter(session.unfinished()), None)
        if job is None:
            return [session, "", gr.skip()]
        try:
            job.update(self.client.cancel(job.id))
        except Exception as exc:
            return [session, self.problem(exc), gr.skip()]
        job.cancel_requested = True
        return [session, "", progress_html(session.latest)]

    def _fetch(self, job: Job) -> Job:
        """Copy the result here through the client, so Gradio serves it and the browser needs no API key."""
        data, job.media_type = self.client.result_bytes(job.id)
        artifacts = (job.result or {}).get("artifacts") or [{"name": "result.bin"}]
        path = self.files_dir / f"{job.id}-{Path(artifacts[0]['name']).name}"
        path.write_bytes(data)
        job.file = str(path)
        return job

    def _results(self, session: Session) -> list[Any]:
        """Gallery, video player, download links, metadata and the raw result of the newest job."""
        video = session.latest_video()
        finished = next((job for job in session.jobs if job.result), None)
        return [
            [
                (job.file, f"{job.prompt} (seed {job.result['seed']})")
                for job in session.with_files()
                if not job.is_video
            ],
            gr.update(value=video.file, visible=True) if video else gr.skip(),
            [job.file for job in session.with_files()],
            metadata_html(finished),
            finished.result if finished else None,
        ]


def _describe(caps: dict[str, Any]) -> str:
    kind = "video" if caps["kind"] == "video" else "image"
    return f"**{caps['name']}** ({kind}, {caps.get('architecture', '')}): {caps.get('description', '')}"


def _acceleration_update(control: AccelerationControl, usable: bool, model: str | None) -> Any:
    if usable:
        return gr.update(interactive=True, info=control.explanation)
    return gr.update(interactive=False, value=False, info=f"{control.explanation} Not available for {model}.")


def _lora_update(usable: bool, model: str | None) -> Any:
    if usable:
        return gr.update(interactive=True, info=LORA_INFO)
    return gr.update(interactive=False, value=[], info=f"{LORA_INFO} Not available for {model}.")


def _cancel(enabled: bool) -> Any:
    return gr.update(interactive=enabled)


def _present(**fields: float | None) -> dict[str, int]:
    """The whole-number fields the user filled in; blank ones take the model's defaults."""
    return {name: int(value) for name, value in fields.items() if value is not None}


def create_ui(api_url: str, api_key: str | None = None) -> gr.Blocks:
    """The page as Gradio Blocks, talking to the service at ``api_url`` (http://host:port)."""
    page = Page(api_url, api_key)
    with gr.Blocks(title="fastgen", analytics_enabled=False) as blocks:
        session = gr.State(Session())
        gr.Markdown(f"# fastgen\nImages and videos from the service at `{page.api_url}`.")
        with gr.Row():
            with gr.Column(scale=5):
                form = _form()
            with gr.Column(scale=6):
                out = _results()
        gr.Markdown("### This session's jobs")
        history = gr.HTML(history_html([]), elem_id="history")
        timer = gr.Timer(POLL_S, active=False)
        _wire(blocks, page, session, form, out, history, timer)
    return blocks


def _form() -> dict[str, Any]:
    f: dict[str, Any] = {}
    f["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", placeholder="a red circle at the top left")
    f["negative"] = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative-prompt")
    f["model"] = gr.Dropdown(label="Model", choices=[], elem_id="model")
    f["model_info"] = gr.Markdown(elem_id="model-info")
    with gr.Row():
        f["width"] = gr.Number(label="Width", precision=0, elem_id="width")
        f["height"] = gr.Number(label="Height", precision=0, elem_id="height")
    with gr.Row():
        f["steps"] = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="steps")
        f["guidance"] = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance", elem_id="guidance")
    with gr.Row():
        f["seed"] = gr.Number(label="Seed", value=0, precision=0, interactive=False, elem_id="seed")
        f["random_seed"] = gr.Checkbox(label="Random seed (reported with the result)", value=True, elem_id="random")
    with gr.Row(visible=False, elem_id="video-controls") as f["video_row"]:
        f["frames"] = gr.Number(label="Frames", precision=0, elem_id="frames")
        f["fps"] = gr.Slider(1, 60, value=8, step=1, label="Frames per second", elem_id="fps")
    # The LoRA picker fills from the service's library; hidden while the library is empty.
    with gr.Row(visible=False, elem_id="lora-controls") as f["lora_row"]:
        f["loras"] = gr.Dropdown(label="LoRA adapters", choices=[], multiselect=True, info=LORA_INFO, elem_id="loras")
        f["lora_scale"] = gr.Slider(-2, 2, value=1.0, step=0.05, label="LoRA scale", elem_id="lora-scale")
    with gr.Group(elem_id="accelerations"):
        gr.Markdown("**Acceleration**: each one only where the chosen model can use it.")
        f["accelerate"] = [
            gr.Checkbox(label=c.label, info=c.explanation, elem_id=f"accel-{c.name}") for c in ACCELERATIONS
        ]
    with gr.Row():
        f["generate"] = gr.Button("Generate", variant="primary", elem_id="generate")
        f["cancel"] = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel")
    f["problem"] = gr.HTML("", elem_id="problem")
    return f


def _results() -> dict[str, Any]:
    r: dict[str, Any] = {}
    r["progress"] = gr.HTML(progress_html(None), elem_id="progress")
    r["gallery"] = gr.Gallery(label="Images", columns=3, height="auto", elem_id="gallery", interactive=False)
    r["video"] = gr.Video(label="Video", visible=False, interactive=False, elem_id="video")
    r["downloads"] = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
    r["metadata"] = gr.HTML("", elem_id="metadata")
    with gr.Accordion("Full result metadata (JSON)", open=False):
        r["result"] = gr.JSON(elem_id="result-json")
    return r


def _wire(blocks: gr.Blocks, page: Page, session, f: dict[str, Any], r: dict[str, Any], history, timer) -> None:
    quick = {"concurrency_limit": None, "show_progress": "hidden"}  # HTTP calls only: no reason to queue behind others
    model_outputs = [f["model_info"], f["width"], f["height"], f["steps"], f["guidance"], f["video_row"]]
    model_outputs += [f["frames"], f["fps"], *f["accelerate"], f["loras"]]
    loaded = [session, f["model"], f["problem"], f["loras"], f["lora_row"]]
    blocks.load(page.load_models, [session], loaded, **quick)
    f["model"].change(page.model_controls, [session, f["model"]], model_outputs, **quick)
    f["random_seed"].change(lambda on: gr.update(interactive=not on), [f["random_seed"]], [f["seed"]], **quick)
    inputs = [session, f["prompt"], f["negative"], f["model"], f["width"], f["height"], f["steps"], f["guidance"]]
    inputs += [f["seed"], f["random_seed"], f["frames"], f["fps"], f["loras"], f["lora_scale"], *f["accelerate"]]
    submitted = [session, f["problem"], r["progress"], history, timer, f["cancel"]]
    f["generate"].click(page.submit, inputs, submitted, **quick)
    results = [r["gallery"], r["video"], r["downloads"], r["metadata"], r["result"]]
    polled = [session, f["problem"], r["progress"], history, *results, timer, f["cancel"]]
    timer.tick(page.poll, [session], polled, **quick)
    f["cancel"].click(page.cancel, [session], [session, f["problem"], r["progress"]], **quick)


def mount_ui(app: FastAPI, api_url: str, api_key: str | None = None, path: str = "/ui") -> FastAPI:
    """Mount the page on ``app`` at ``path``: system fonts, no analytics, no run history, no SSR node server."""
    blocks = create_ui(api_url, api_key)
    # The page's handlers wait on HTTP calls to the API, whose sync endpoints run on anyio's default thread
    # pool. Gradio shares that pool unless max_threads differs from its default (40); a pool of its own
    # means busy pages can never take every thread the API needs to answer them.
    blocks.max_threads = UI_THREADS
    return gr.mount_gradio_app(
        app,
        blocks,
        path=path,
        theme=theme(),
        css=CSS,
        footer_links=[],
        run_history=False,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        show_error=False,
    )
