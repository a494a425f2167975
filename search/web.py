"""A local web page for moment search (issue 19, item 4): ``python -m search.web --index INDEX``.

Type a query, get the index's top moments, each with a thumbnail of its first frame, the
subtitle lines it overlaps and a player that starts (and stops) at the moment. Gradio is an
optional extra (``pip install -r requirements-web.txt``) so the core install stays lean; the
page runs on CPU like the index.

Why these choices:

* the results are one HTML block, not a gr.Gallery/gr.Video per moment: a single round trip
  renders any number of rows, and a plain ``<video src="...#t=start,end">`` (W3C media
  fragment) makes the browser seek to the moment and pause at its end with no JavaScript;
* the player reads the source file through Gradio's own file route, and only the index's
  video files are passed to ``allowed_paths`` (files, not their folders), so the page serves
  nothing else from the disk;
* thumbnails are decoded with PyAV (as the feature extraction does) and inlined as data URIs:
  no temporary files to serve or clean up; an index built from existing DBs has no video
  files, so its moments get a placeholder image and no player.
"""
from __future__ import annotations

import argparse
import base64
import functools
import html
import io
import logging
import os
import urllib.parse

from utils.errors import HeroError, run_main

LOGGER = logging.getLogger(__name__)
REQUIREMENTS = "requirements-web.txt"
THUMB_WIDTH = 160
FILE_ROUTE = "gradio_api/file="  # relative: also right behind a proxy that adds a path prefix
PLACEHOLDER_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="160" height="90" viewBox="0 0 160 90">'
    '<rect width="160" height="90" fill="#d9d9d9"/><text x="80" y="50" font-size="12" '
    'text-anchor="middle" fill="#555">no video file</text></svg>')
PLACEHOLDER = "data:image/svg+xml;base64," + base64.b64encode(PLACEHOLDER_SVG.encode()).decode()
CSS = """
.hero-moment {display: flex; gap: 12px; align-items: flex-start; padding: 8px 0;
              border-bottom: 1px solid #ddd}
.hero-thumb {width: 160px; flex: none}
.hero-info {flex: 1; min-width: 0}
.hero-subs {margin: 4px 0; padding-left: 18px}
.hero-player {width: 320px; max-width: 100%; flex: none}
"""


def import_gradio():
    """Gradio, or a :class:`HeroError` saying how to install the optional extra."""
    try:
        import gradio
    except ImportError as exc:
        raise HeroError(f"the moment-search web page needs Gradio, an optional extra: "
                        f"pip install -r {REQUIREMENTS}") from exc
    return gradio


# --------------------------------------------------------------------------- thumbnails
def first_frame(path: str, time_s: float):
    """The first decoded frame at or after ``time_s`` (the last frame when ``time_s`` is past
    the end), as a PIL image; seeking to the preceding keyframe keeps long videos cheap."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        if time_s > 0 and stream.time_base is not None:
            container.seek(int(time_s / stream.time_base), stream=stream, backward=True)
        last = None
        for frame in container.decode(stream):
            last = frame
            # a frame whose display time rounds to time_s counts as "at" it (1 ms tolerance)
            if frame.time is not None and frame.time >= time_s - 1e-3:
                break
        return None if last is None else last.to_image()


@functools.lru_cache(maxsize=1024)
def thumbnail(path: str | None, time_s: float, width: int = THUMB_WIDTH) -> str:
    """A JPEG data URI of the frame at ``time_s`` of ``path``, ``width`` px wide; the
    placeholder when there is no file or it cannot be decoded (logged: the page stays up).
    Cached: the same moments come back for related queries."""
    if not path:
        return PLACEHOLDER
    try:
        image = first_frame(path, time_s)
    except Exception as exc:  # noqa: BLE001 - any decoding failure degrades to the placeholder
        LOGGER.warning("no thumbnail for %s at %.2f s: %s", path, time_s, exc)
        return PLACEHOLDER
    if image is None:
        return PLACEHOLDER
    height = max(1, round(image.height * width / image.width))
    buf = io.BytesIO()
    image.convert("RGB").resize((width, height)).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------- rendering
def media_url(path: str, start: float, end: float) -> str:
    """The URL of ``path`` through Gradio's file route, with a ``#t=start,end`` fragment so
    the browser's player opens at the moment and pauses at its end."""
    quoted = urllib.parse.quote(os.path.abspath(path))
    return f"{FILE_ROUTE}{quoted}#t={start:.2f},{end:.2f}"


def render_moment(index, moment) -> str:
    """One result row: thumbnail, rank/video/time/score, subtitle lines, player."""
    esc = html.escape
    path = moment.path
    subs = index.subtitles(moment.video, moment.start, moment.end)
    sub_html = ("".join(f"<li>{esc(line.strip())}</li>" for line in subs) if subs
                else '<li class="hero-nosub"><i>no subtitle in this moment</i></li>')
    player = (f'<video class="hero-player" controls preload="metadata" '
              f'src="{esc(media_url(path, moment.start, moment.end))}"></video>' if path
              else "")
    return (f'<div class="hero-moment" data-rank="{moment.rank}" '
            f'data-video="{esc(moment.video)}" data-start="{moment.start:.2f}" '
            f'data-end="{moment.end:.2f}">'
            f'<img class="hero-thumb" alt="first frame of the moment" '
            f'src="{thumbnail(path, float(moment.start))}">'
            f'<div class="hero-info"><b>#{moment.rank}</b> {esc(moment.video)} &nbsp; '
            f'{moment.start:.2f} s - {moment.end:.2f} s &nbsp; score {moment.score:.4f}'
            f'<ul class="hero-subs">{sub_html}</ul></div>{player}</div>')


def render_results(index, query: str, top_k: int) -> str:
    """The results block for ``query``; a user error (empty query, a word-less query the
    index refuses) is shown on the page instead of breaking it."""
    query = (query or "").strip()
    if not query:
        return '<p class="hero-empty">Type a query, e.g. "a man opens the door".</p>'
    try:
        moments = index.search(query, top_k=int(top_k))
    except HeroError as exc:
        return f'<p class="hero-error">{html.escape(str(exc))}</p>'
    if not moments:
        return f'<p class="hero-empty">No moment found for "{html.escape(query)}".</p>'
    rows = "".join(render_moment(index, m) for m in moments)
    return (f'<div class="hero-results" data-query="{html.escape(query)}">'
            f'<p>{len(moments)} moments for "{html.escape(query)}"</p>{rows}</div>')


# --------------------------------------------------------------------------- the app
def allowed_files(index) -> list[str]:
    """The absolute paths of the index's video files: all the page may serve from the disk."""
    paths = (index.video_path(video) for video in index.videos())
    return sorted({os.path.abspath(p) for p in paths if p})


def build_app(index, top_k: int = 10):
    """The Gradio Blocks of the page (not launched): query box, Search button, top-k slider,
    results block; Enter in the box and the button both search."""
    gr = import_gradio()
    with gr.Blocks(title="HERO moment search") as app:
        gr.Markdown(f"## HERO moment search\n{len(index.videos())} videos, one feature "
                    f"frame per {index.frame_interval:g} s.")
        with gr.Row():
            query = gr.Textbox(label="Query", placeholder="a man opens the door", scale=4,
                               elem_id="hero-query")
            k = gr.Slider(1, 50, value=top_k, step=1, label="Moments", scale=1,
                          elem_id="hero-topk")
        button = gr.Button("Search", variant="primary", elem_id="hero-search")
        results = gr.HTML(render_results(index, "", top_k), elem_id="hero-results")
        search = functools.partial(render_results, index)
        button.click(search, inputs=[query, k], outputs=results)
        query.submit(search, inputs=[query, k], outputs=results)
    return app


def serve(index, host: str = "127.0.0.1", port: int = 7860, top_k: int = 10) -> None:
    """Serve the page until interrupted (blocks)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no call home from a lab box
    app = build_app(index, top_k)
    app.launch(server_name=host, server_port=port, allowed_paths=allowed_files(index),
               css=CSS, share=False, inbrowser=False)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="index folder (scripts/build_index.py)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1",
                        help="0.0.0.0 to reach it from other machines (it serves the "
                             "index's video files to anyone who can reach the port)")
    parser.add_argument("--top_k", type=int, default=10, help="moments shown by default")
    parser.add_argument("--device", default="cpu", help="device of the index's model")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    """Load the index, then serve the page; Gradio is checked first so a missing extra is
    reported before the (slower) index load."""
    args = parse_args(argv)
    import_gradio()
    from search.index import MomentIndex

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests
    index = MomentIndex.load(args.index, device=args.device)
    LOGGER.info("loaded %r", index)
    serve(index, args.host, args.port, args.top_k)


if __name__ == "__main__":
    run_main(main)
