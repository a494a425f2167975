"""The moment-search web page (issue 19, item 4), in a real headless Chromium.

The page runs as ``python -m search.web`` would run it, in its own process on 127.0.0.1 and a
free port; Debian's Chromium is driven over the DevTools protocol on a pipe (stdlib only, no
browser download, no WebDriver): it types a query in the box, clicks Search, waits for the
results and reads what the page rendered - moment rows, thumbnails decoded by the browser,
subtitle lines, and players whose media fragment put them at the moment's start.

The videos are short synthetic clips written with ``write_test_video`` as the feature-extraction
tests write them, in VP9/WebM and H.264/MP4 (which Chromium plays), with .srt subtitles. Two
indexes are searched:

* a real one, built by scripts/build_index.py from those files (the project's feature
  extraction with tiny random networks) with a tiny TVR model fine-tuned for 2 updates on the
  toy corpus, served by ``python -m search.web --index``;
* a small stand-in with the :class:`search.MomentIndex` interface that ranks subtitle lines by
  the words they share with the query: known results, and a video without a file, so the
  placeholder is exercised too, and the player is played to the moment's end.

Chromium missing: the test fails under CI (``.ci/run`` installs it, see ``make setup-web``)
and is skipped elsewhere, with the install command in both messages.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # also when run as a script (the served app, below)
    sys.path.insert(0, str(ROOT))

from scripts.extract.video_io import write_test_video  # noqa: E402
from search import Moment, web  # noqa: E402

FPS = 10
# name -> (file name or None, seconds, codec); vA and vB are played by the browser
CLIPS = {"vA": ("vA.webm", 6.0, "libvpx-vp9"), "vB": ("vB.mp4", 5.0, "libx264"),
         "vC": (None, 4.0, None)}
SUBTITLES = {
    "vA": [[0.0, 2.0, "a man walks into the kitchen"], [2.0, 4.0, "he opens the red door"],
           [4.0, 6.0, "the door closes slowly"]],
    "vB": [[1.0, 3.0, "a red square moves across the street"], [3.0, 5.0, "cars drive by"]],
    "vC": [[0.0, 4.0, "an old red photograph of a door"]],
}
QUERY = "opens the red door"
INSTALL = "apt-get install -y chromium (or: make setup-web), or set HERO_CHROMIUM"
PAGE_TIMEOUT_S = 90


# --------------------------------------------------------------------------- stand-in index
class FakeIndex:
    """A MomentIndex stand-in: each subtitle line is a moment, scored by the share of the
    query's words it contains (ties: video name, start)."""

    frame_interval = 1.5

    def __init__(self, video_dir: str | None):
        self.paths = {v: (os.path.join(video_dir, name) if video_dir and name else None)
                      for v, (name, _, _) in CLIPS.items()}

    def videos(self):
        return sorted(self.paths)

    def video_path(self, video):
        return self.paths[video]

    def subtitles(self, video, start, end):
        return [text for st, ed, text in SUBTITLES[video] if st < end and ed > start]

    def search(self, query, top_k=10):
        words = set(query.lower().split())
        scored = [(len(words & set(text.split())) / len(words), v, st, ed)
                  for v, lines in SUBTITLES.items() for st, ed, text in lines]
        scored = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1], s[2]))
        return [Moment(v, self.paths[v], st, ed, score, rank)
                for rank, (score, v, st, ed) in enumerate(scored[:top_k], 1)]


def make_videos(root: Path) -> str:
    video_dir = root / "videos"
    video_dir.mkdir()
    for name, seconds, codec in CLIPS.values():
        if name:
            write_test_video(str(video_dir / name), seconds, FPS, codec=codec)
    return str(video_dir)


# --------------------------------------------------------------------------- the browser
class Chromium:
    """Headless Chromium on the DevTools protocol over ``--remote-debugging-pipe``: the
    browser reads NUL-terminated JSON commands on fd 3 and writes replies/events on fd 4, so
    no WebSocket client (nor any package) is needed."""

    def __init__(self, binary: str, profile: str):
        # pipe ends moved to fds >= 10 so that none is already 3 or 4; bash (not a
        # preexec_fn: unsafe with threads) then puts them on 3 and 4 for the browser
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_r, from_w)]
        for fd in (to_r, from_w):
            os.close(fd)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--no-default-browser-check", "--mute-audio",
                 "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        move = f'exec "$0" "$@" 3<&{ends[0]} 4>&{ends[1]} {ends[0]}<&- {ends[1]}>&-'
        self.proc = subprocess.Popen(["bash", "-c", move, binary, *flags], pass_fds=ends,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in ends:
            os.close(fd)
        self._buf, self._next_id = b"", 0

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_r], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._from_r, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.proc.poll()})")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params=None, session=None, timeout: float = 30.0) -> dict:
        """Send one command, return its result (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_w)
        os.close(self._from_r)


class Page:
    """One tab of :class:`Chromium`: navigate, evaluate JavaScript, type, click, wait."""

    def __init__(self, browser: Chromium):
        self.browser = browser
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.call("Target.attachToTarget",
                                    {"targetId": target, "flatten": True})["sessionId"]

    def send(self, method, params=None):
        return self.browser.call(method, params, self.session)

    def js(self, expression: str):
        """The value of ``expression`` (awaited when it is a promise); a page error raises."""
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = PAGE_TIMEOUT_S, what: str = ""):
        """Poll ``expression`` until truthy; on timeout the page's text is in the error."""
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > deadline:
                text = self.js("document.body ? document.body.innerText : ''")
                raise AssertionError(f"timed out after {timeout} s waiting for "
                                     f"{what or expression}; the page shows:\n{text}")
            time.sleep(0.2)

    def type_text(self, selector: str, text: str) -> None:
        """Focus ``selector`` and type ``text`` as keyboard input (real input events)."""
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", {"text": text})

    def click(self, selector: str) -> None:
        """A real mouse click (press + release) at the centre of ``selector``."""
        x, y = self.js(f"(() => {{const r = document.querySelector({json.dumps(selector)})"
                       f".getBoundingClientRect(); return [r.x + r.width / 2, "
                       f"r.y + r.height / 2]}})()")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y,
                                                   "button": "left", "clickCount": 1})


def chromium_binary() -> str:
    """The Chromium to drive; missing: a failure under CI, a skip elsewhere."""
    binary = os.environ.get("HERO_CHROMIUM") or shutil.which("chromium")
    if binary and os.access(binary, os.X_OK):
        return binary
    message = f"Chromium not found for the web-page test: {INSTALL}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def browser(tmp_path):
    chrome = Chromium(chromium_binary(), str(tmp_path / "profile"))
    yield chrome
    chrome.close()


# --------------------------------------------------------------------------- the served app
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    """Start the page's process and wait until it answers HTTP on ``port``; its log is
    shown when it dies or never answers."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited ({proc.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"the app never answered on port {port}:\n{log.read_text()}")


@contextlib.contextmanager
def served(cmd: list[str], port: int, log: Path):
    """The page's process while the block runs (its URL), terminated after."""
    proc = start_app(cmd, port, log)
    try:
        yield f"http://127.0.0.1:{port}/"
    except AssertionError as exc:  # what the page did is often in the app's log
        raise AssertionError(f"{exc}\n--- app log ---\n{log.read_text()[-4000:]}") from exc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def app_url(tmp_path):
    """The page over the stand-in index and the synthetic clips, in its own process."""
    video_dir = make_videos(tmp_path)
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", video_dir, "--port", str(port)]
    with served(cmd, port, tmp_path / "app.log") as url:
        yield url, FakeIndex(video_dir)


def write_srt(path: Path, lines) -> None:
    """``lines`` ([start_s, end_s, text]) as an .srt file, the format build_index.py reads."""
    def stamp(t: float) -> str:
        ms = round(t * 1000)
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"

    path.write_text("".join(f"{n}\n{stamp(st)} --> {stamp(ed)}\n{text}\n\n"
                            for n, (st, ed, text) in enumerate(lines, 1)))


@pytest.fixture(scope="module")
def real_index(tmp_path_factory, toy_dbs):
    """The index scripts/build_index.py builds from the synthetic clips and their .srt files
    (feature extraction with tiny random networks, 32 px frames) with a tiny TVR model
    fine-tuned for 2 updates on the toy corpus, as tests/test_search_index.py trains it."""
    from helpers_train import write_config

    import train_vcmr
    from search import build

    tmp = tmp_path_factory.mktemp("web_index")
    cfg = write_config(tmp, "train-tvr-demo.json", toy_dbs, train_batch_size=4,
                       num_train_steps=2, valid_steps=1000, save_steps=2, warmup_steps=1,
                       hard_negtiave_start_step=[1000])
    train_vcmr.main(["--config", str(cfg), "--output_dir", str(tmp / "run")])
    ckpt = sorted((tmp / "run" / "ckpt").glob("model_step_2*.pt"))[-1]
    video_dir, subs = make_videos(tmp), tmp / "subs"
    subs.mkdir()
    for video, (name, _, _) in CLIPS.items():
        if name:
            write_srt(subs / f"{Path(name).stem}.srt", SUBTITLES[video])
    toker = json.loads((toy_dbs / "txt_db" / "tv_subtitles.db" / "meta.json").read_text())
    build.main(["--videos", video_dir, "--subtitles", str(subs), "--model_dir",
                str(tmp / "run"), "--ckpt", str(ckpt), "--out", str(tmp / "index"),
                "--random_weights", "--tiny", "--frame_size", "32", "--toker",
                toker["toker"], "--device", "cpu"])
    return tmp / "index"


# --------------------------------------------------------------------------- browser test
READ_RESULTS = """(() => [...document.querySelectorAll('#hero-results .hero-moment')].map(row => {
  const img = row.querySelector('img.hero-thumb'), video = row.querySelector('video');
  return {rank: +row.dataset.rank, video: row.dataset.video, start: +row.dataset.start,
          end: +row.dataset.end, text: row.innerText,
          subs: [...row.querySelectorAll('.hero-subs li')].map(li => li.innerText),
          img: img && {src: img.getAttribute('src').slice(0, 30), width: img.naturalWidth,
                       done: img.complete},
          player: video && {src: video.getAttribute('src'), ready: video.readyState,
                            time: video.currentTime, error: video.error && video.error.code}};
}))()"""
PLAY_FIRST = """(async () => {const v = document.querySelector('#hero-results video');
  v.muted = true; await v.play();
  await new Promise(done => v.addEventListener('pause', done, {once: true}));
  return v.currentTime;})()"""
PLAYERS_READY = ("[...document.querySelectorAll('#hero-results video')]"
                 ".every(v => v.readyState >= 1 || v.error)")


def search_in_browser(browser: Chromium, url: str, query: str) -> tuple[Page, list]:
    """Open the page, type ``query``, click Search, wait for the rows and for every player's
    metadata (or error), and return the page and what it rendered."""
    page = Page(browser)
    page.send("Page.navigate", {"url": url})
    page.wait_for("!!document.querySelector('#hero-query textarea, #hero-query input') && "
                  "!!document.querySelector('#hero-search')", what="the query box and button")
    page.type_text("#hero-query textarea, #hero-query input", query)
    page.click("#hero-search")
    page.wait_for("document.querySelectorAll('#hero-results .hero-moment').length > 0",
                  what="the result rows")
    page.wait_for(PLAYERS_READY, what="the players' metadata")
    return page, page.js(READ_RESULTS)


def check_rows(rows: list, index, query: str) -> None:
    """The rendered rows are the index's moments for ``query``, in order, each with its
    subtitle lines and a decoded thumbnail; a moment with a file has a player standing at
    the moment's start, one without has the placeholder and no player."""
    expected = index.search(query, top_k=10)
    assert [(r["rank"], r["video"], r["start"], r["end"]) for r in rows] == \
        [(m.rank, m.video, round(m.start, 2), round(m.end, 2)) for m in expected]
    for row, moment in zip(rows, expected):
        subs = [line.strip() for line in index.subtitles(moment.video, moment.start,
                                                         moment.end)]
        assert row["subs"] == (subs or ["no subtitle in this moment"]), row
        assert row["img"]["done"] and row["img"]["width"] == web.THUMB_WIDTH, row
        if moment.path is None:
            assert row["img"]["src"].startswith("data:image/svg+xml") and not row["player"]
            continue
        assert row["img"]["src"].startswith("data:image/jpeg")
        player = row["player"]
        assert player["src"].endswith(f"#t={moment.start:.2f},{moment.end:.2f}")
        assert player["error"] is None and player["ready"] >= 1, player
        assert player["time"] == pytest.approx(moment.start, abs=0.05), player


def test_page_renders_the_moments_of_a_typed_query(browser, app_url):
    url, index = app_url
    page, rows = search_in_browser(browser, url, QUERY)
    check_rows(rows, index, QUERY)
    assert {r["video"] for r in rows} == {"vA", "vB", "vC"}  # both players and the placeholder
    assert rows[0]["subs"] == ["he opens the red door"]
    # played, the first player stops by itself at the moment's end (the fragment's end)
    assert page.js(PLAY_FIRST) == pytest.approx(rows[0]["end"], abs=0.3)
    # the file route serves the index's videos and nothing else from the disk
    status = "(async p => (await fetch('gradio_api/file=' + p)).status)"
    assert page.js(f"{status}({json.dumps(index.paths['vA'])})") in (200, 206)  # 206: cached
    for other in (__file__, "/etc/passwd"):
        assert page.js(f"{status}({json.dumps(other)})") == 403, other


def test_page_over_a_real_index(browser, real_index, tmp_path):
    """``python -m search.web --index`` over an index that scripts/build_index.py built from
    the synthetic clips and their subtitles: real ranking, thumbnails, subtitles, players."""
    from search import MomentIndex

    port = free_port()
    cmd = [sys.executable, "-m", "search.web", "--index", str(real_index), "--port", str(port)]
    with served(cmd, port, tmp_path / "app.log") as url:
        page, rows = search_in_browser(browser, url, QUERY)
        status = "(async p => (await fetch('gradio_api/file=' + p)).status)"
        assert page.js(f"{status}({json.dumps(__file__)})") == 403  # only the index's videos
    index = MomentIndex.load(real_index)
    check_rows(rows, index, QUERY)
    assert {r["video"] for r in rows} == {"vA", "vB"} and all(r["player"] for r in rows)
    assert any(r["subs"] != ["no subtitle in this moment"] for r in rows)


# --------------------------------------------------------------------------- no browser
def test_thumbnail_is_the_first_frame_of_the_moment(tmp_path):
    """The thumbnail at ``t`` is the frame a full decode shows at ``t`` (seeking to a keyframe
    must not land on another frame), and the last frame past the end."""
    import av
    import numpy as np

    path = str(tmp_path / "clip.mp4")
    write_test_video(path, 4.0, FPS, codec="mpeg4")  # keyframes every 12 frames
    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for start, i in ((0.0, 0), (2.0, 20), (3.3, 33), (3.35, 34), (9.0, len(frames) - 1)):
        np.testing.assert_array_equal(np.asarray(web.first_frame(path, start)), frames[i],
                                      err_msg=f"start {start}")
    assert web.thumbnail(path, 2.0).startswith("data:image/jpeg;base64,")
    assert web.thumbnail(None, 2.0) == web.PLACEHOLDER
    assert web.thumbnail(str(tmp_path / "missing.mp4"), 1.0) == web.PLACEHOLDER


def test_page_serves_only_the_index_files_and_escapes_text(tmp_path):
    index = FakeIndex(make_videos(tmp_path))
    assert web.allowed_files(index) == sorted(p for p in index.paths.values() if p)
    moment = Moment("<b>x</b>", None, 1.0, 2.0, 0.5, 1)
    index.subtitles = lambda *a: ["<script>alert(1)</script>"]
    row = web.render_moment(index, moment)
    assert "<script>" not in row and "&lt;b&gt;x&lt;/b&gt;" in row and "<video" not in row
    assert "Type a query" in web.render_results(index, "  ", 5)


def test_missing_gradio_names_the_requirements_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(web.HeroError, match=r"pip install -r requirements-web\.txt"):
        web.import_gradio()


# --------------------------------------------------------------------------- app process
if __name__ == "__main__":  # the page over the stand-in index (test_page_renders_...)
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", required=True, help="folder of the synthetic clips")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.serve(FakeIndex(args.serve), "127.0.0.1", args.port)
