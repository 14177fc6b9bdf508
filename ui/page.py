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
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import httpx
from fastapi import FastAPI

from fastgen.client import FastgenClient, ServiceError
from fastgen.techniques import TECHNIQUES
from fastgen.ui.render import (
    field_problems_html,
    history_html,
    metadata_html,
    problem_html,
    problem_text,
    progress_html,
    refused_html,
    unusable_text,
)
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


# One checkbox per technique of fastgen.techniques that has a control; a model's capabilities say which it takes.
ACCELERATIONS = tuple(
    AccelerationControl(t.name, t.control.label, t.control.explanation, t.control.turned_on)
    for t in TECHNIQUES
    if t.control is not None
)

LORA_INFO = "Adapters from the service's LoRA library, all at the scale beside; swapped in without reloading."

# Where a refused request's problems show: a field's first name part -> the area right under the control that
# sets it, and that control's label. Problems with fields no control sets stay under the buttons.
FIELD_PLACES = {
    "prompt": ("prompt", "Prompt"),
    "negative_prompt": ("negative", "Negative prompt"),
    "model": ("model", "Model"),
    "width": ("size", "Width"),
    "height": ("size", "Height"),
    "steps": ("sampling", "Steps"),
    "guidance": ("sampling", "Guidance"),
    "seed": ("seed", "Seed"),
    "num_images": ("seed", "Images"),
    "num_frames": ("video", "Frames"),
    "fps": ("video", "Frames per second"),
    "loras": ("loras", "LoRA adapters"),
    "accelerate": ("accelerate", "Acceleration"),
}
PROBLEM_AREAS = ("prompt", "negative", "model", "size", "sampling", "seed", "video", "loras", "accelerate")
REFUSED = "The service refused the request; nothing was queued. What it said is shown under each field concerned."
# Runs in the browser, so the seed box locks the moment the box is ticked rather than a server round trip later.
SEED_FOLLOWS_RANDOM = "(random) => ({__type__: 'update', interactive: !random})"

CSS = """
.fg-progress { margin: 4px 0 8px; }
.fg-track { height: 10px; border-radius: 5px; background: var(--neutral-200); overflow: hidden; }
.fg-fill { height: 100%; background: var(--color-accent); transition: width 0.3s; }
.fg-progress[data-state="failed"] .fg-fill { background: var(--error-text-color); }
.fg-progress[data-state="cancelled"] .fg-fill { background: var(--neutral-400); }
.fg-progress[data-state="refused"] .fg-progress-text { color: var(--error-text-color); }
.fg-progress-text { margin-top: 4px; font-variant-numeric: tabular-nums; }
.fg-problem { border: 1px solid var(--error-border-color); background: var(--error-background-fill);
  color: var(--error-text-color); border-radius: 6px; padding: 8px 12px; }
.fg-problem ul { margin: 4px 0 0 18px; }
.fg-field-problem { margin: 0 0 6px 18px; font-size: 0.95em; }
.fg-field-problem li, .fg-field-problem b { color: var(--error-text-color); }
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
    images: float | None
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
        else:
            request |= _present(num_images=self.images)
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
        session.models = {m["name"]: m for m in models if m.get("usable", True)}
        names = list(session.models)
        picked = gr.update(choices=names, value=names[0] if names else None)
        unusable = [m for m in models if not m.get("usable", True)]
        note = problem_html(*unusable_text(unusable)) if unusable else ""
        return session, picked, note, gr.update(choices=loras, value=[]), gr.update(visible=bool(loras))

    def model_controls(self, session: Session, name: str | None) -> list[Any]:
        """Defaults and visibility for the chosen model: size step, video fields, usable accelerations."""
        caps = session.models.get(name or "")
        if caps is None:
            return [gr.update()] * (10 + len(ACCELERATIONS))
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
            gr.update(visible=not video),
            gr.update(visible=video),
            gr.update(value=d.get("num_frames"), info=frames_info),
            gr.update(value=d.get("fps") or 8),
            *(_acceleration_update(control, control.name in usable, name) for control in ACCELERATIONS),
            _lora_update(bool(caps.get("loras")), name),
        ]

    def submit(self, session: Session, *values: Any) -> list[Any]:
        """Queue the job and return at once; the timer takes over from here. The last results leave the screen."""
        form = Form(*values[: len(Form._fields) - 1], accelerate=values[len(Form._fields) - 1 :])
        caps = session.models.get(form.model or "", {})
        request = form.request(caps)
        try:
            answer = self.client.submit(request)
        except Exception as exc:
            return self._not_queued(session, exc)
        job = Job(answer["id"], answer["model"], caps.get("kind", "image"), form.prompt, bool(form.random_seed))
        session.add(job)
        queued = [session, "", progress_html(job), history_html(session.jobs), gr.update(active=True), _cancel(True)]
        return queued + _cleared_results() + _problem_areas({})

    def _not_queued(self, session: Session, exc: Exception) -> list[Any]:
        """A refusal's problems under the controls they concern (the rest under the buttons); the bar says so."""
        if isinstance(exc, ServiceError) and exc.status_code == 422:
            placed, rest = place_problems(exc.detail or [{"field": "request", "message": exc.message}])
            problem = problem_html(REFUSED, rest)
            bar = refused_html("Refused by the service: nothing was queued. Its reasons are shown under the fields.")
        else:
            placed, problem = {}, self.problem(exc)
            bar = refused_html("Not queued: the service could not take the job (the reason is under Generate).")
        return [session, problem, bar, gr.skip(), gr.skip(), gr.skip()] + _cleared_results() + _problem_areas(placed)

    def poll(self, session: Session) -> list[Any]:
        """Read every unfinished job's status; fetch the files of the ones that have succeeded."""
        try:
            ended = [job for job in session.unfinished() if job.update(self.client.status(job.id))]
            fetched = [self._fetch(job) for job in session.jobs if job.status == "succeeded" and not job.files]
        except Exception as exc:  # keep polling: the service may come back
            session.poll_failed = True
            return [session, self.problem(exc), *[gr.skip()] * 7, gr.update(active=True), gr.skip()]
        cleared = "" if session.poll_failed else gr.skip()  # a submit's own problem stays until the next submit
        session.poll_failed = False
        busy = bool(session.unfinished())
        # Results show once the newest job has ended: an older one ending meanwhile must not fill the area again.
        newest_ended = bool(session.latest and session.latest.done and (ended or fetched))
        return [
            session,
            cleared,
            progress_html(session.latest),
            history_html(session.jobs),
            *(self._results(session) if newest_ended else [gr.skip()] * 5),
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
        """Copy the result's files here through the client, so Gradio serves them and the browser needs no API key."""
        artifacts = (job.result or {}).get("artifacts") or [{"name": "result.bin"}]
        files = []
        for index, artifact in enumerate(artifacts):
            data, job.media_type = self.client.result_bytes(job.id, index)
            path = self.files_dir / f"{job.id}-{Path(artifact['name']).name}"
            path.write_bytes(data)
            files.append(str(path))
        job.files = files
        return job

    def _results(self, session: Session) -> list[Any]:
        """The session's images, video and downloads (newest first); the newest job's metadata and raw result."""
        video = session.latest_video()
        latest = session.latest
        return [
            [caption for job in session.with_files() if not job.is_video for caption in job.captions()],
            gr.update(value=video.files[0], visible=True) if video else gr.skip(),
            [file for job in session.with_files() for file in job.files],
            metadata_html(latest),
            latest.result if latest else None,
        ]


def place_problems(detail: list[dict[str, str]]) -> tuple[dict[str, list[tuple[str, str]]], list[dict[str, str]]]:
    """Each problem as (label, message) by the area of the control it concerns; those no control sets, as given."""
    placed: dict[str, list[tuple[str, str]]] = {}
    rest = []
    for problem in detail:
        name, *sub = re.split(r"[.\[\]]+", str(problem.get("field", "")))  # "loras[0].name", "accelerate.cache"
        if name not in FIELD_PLACES:
            rest.append(problem)
            continue
        area, label = FIELD_PLACES[name]
        placed.setdefault(area, []).append((_sub_label(name, sub) or label, str(problem.get("message", ""))))
    return placed, rest


def _sub_label(name: str, sub: list[str]) -> str | None:
    """The label of the control that sets part of a field: the LoRA scale, one acceleration."""
    if name == "loras" and sub and sub[-1] == "scale":
        return "LoRA scale"
    if name == "accelerate" and sub:
        return next((c.label for c in ACCELERATIONS if c.name == sub[0]), None)
    return None


def _cleared_results() -> list[Any]:
    """Gallery, video, downloads, metadata and raw result emptied: nothing on screen belongs to an older job."""
    return [[], gr.update(value=None, visible=False), None, "", None]


def _problem_areas(placed: dict[str, list[tuple[str, str]]]) -> list[Any]:
    return [gr.update(value=field_problems_html(placed.get(a, [])), visible=a in placed) for a in PROBLEM_AREAS]


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
    f: dict[str, Any] = {"problems": {}}
    area = f["problems"]
    f["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", placeholder="a red circle at the top left")
    area["prompt"] = _problem_area("prompt")
    f["negative"] = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative-prompt")
    area["negative"] = _problem_area("negative")
    f["model"] = gr.Dropdown(label="Model", choices=[], elem_id="model")
    area["model"] = _problem_area("model")
    f["model_info"] = gr.Markdown(elem_id="model-info")
    with gr.Row():
        f["width"] = gr.Number(label="Width", precision=0, elem_id="width")
        f["height"] = gr.Number(label="Height", precision=0, elem_id="height")
    area["size"] = _problem_area("size")
    with gr.Row():
        f["steps"] = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="steps")
        f["guidance"] = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance", elem_id="guidance")
    area["sampling"] = _problem_area("sampling")
    with gr.Row():
        f["seed"] = gr.Number(label="Seed", value=0, precision=0, interactive=False, elem_id="seed")
        f["random_seed"] = gr.Checkbox(label="Random seed (reported with the result)", value=True, elem_id="random")
        f["images"] = gr.Number(
            label="Images",
            value=1,
            precision=0,
            minimum=1,
            info="each with its own seed: seed, seed + 1, ...",
            elem_id="images",
        )
    area["seed"] = _problem_area("seed")
    with gr.Row(visible=False, elem_id="video-controls") as f["video_row"]:
        f["frames"] = gr.Number(label="Frames", precision=0, elem_id="frames")
        f["fps"] = gr.Slider(1, 60, value=8, step=1, label="Frames per second", elem_id="fps")
    area["video"] = _problem_area("video")
    # The LoRA picker fills from the service's library; hidden while the library is empty.
    with gr.Row(visible=False, elem_id="lora-controls") as f["lora_row"]:
        f["loras"] = gr.Dropdown(label="LoRA adapters", choices=[], multiselect=True, info=LORA_INFO, elem_id="loras")
        f["lora_scale"] = gr.Slider(-2, 2, value=1.0, step=0.05, label="LoRA scale", elem_id="lora-scale")
    area["loras"] = _problem_area("loras")
    with gr.Group(elem_id="accelerations"):
        gr.Markdown("**Acceleration**: each one only where the chosen model can use it.")
        f["accelerate"] = [
            gr.Checkbox(label=c.label, info=c.explanation, elem_id=f"accel-{c.name}") for c in ACCELERATIONS
        ]
    area["accelerate"] = _problem_area("accelerate")
    with gr.Row():
        f["generate"] = gr.Button("Generate", variant="primary", elem_id="generate")
        f["cancel"] = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel")
    f["problem"] = gr.HTML("", elem_id="problem")
    return f


def _problem_area(name: str) -> gr.HTML:
    """Where a refused request's problems with the control just above show; hidden while there are none."""
    return gr.HTML("", visible=False, elem_id=f"problem-{name}")


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
    model_outputs = [f["model_info"], f["width"], f["height"], f["steps"], f["guidance"], f["images"], f["video_row"]]
    model_outputs += [f["frames"], f["fps"], *f["accelerate"], f["loras"]]
    loaded = [session, f["model"], f["problem"], f["loras"], f["lora_row"]]
    blocks.load(page.load_models, [session], loaded, **quick)
    f["model"].change(page.model_controls, [session, f["model"]], model_outputs, **quick)
    f["random_seed"].change(None, [f["random_seed"]], [f["seed"]], js=SEED_FOLLOWS_RANDOM, **quick)
    inputs = [session, f["prompt"], f["negative"], f["model"], f["width"], f["height"], f["steps"], f["guidance"]]
    inputs += [f["seed"], f["random_seed"], f["images"], f["frames"], f["fps"], f["loras"], f["lora_scale"]]
    inputs += f["accelerate"]
    results = [r["gallery"], r["video"], r["downloads"], r["metadata"], r["result"]]
    submitted = [session, f["problem"], r["progress"], history, timer, f["cancel"], *results]
    submitted += [f["problems"][name] for name in PROBLEM_AREAS]
    f["generate"].click(page.submit, inputs, submitted, **quick)
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
