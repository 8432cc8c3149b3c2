"""A client-side pair viewer: synthetic | aligned training | difference, with linked zoom, pan and window/level.

:func:`pair_viewer_html` returns one self-contained HTML document (inline script and style, the images as PNG
data URIs, nothing loaded from the network) that the app renders with ``streamlit.components.v1.html``. Every
interaction runs in the browser, so zooming, panning and windowing never round-trip to the server:

- mouse wheel: zoom about the cursor, the three panes together;
- drag (left button): pan, the three panes together;
- drag with the right button, or with Shift: window/level (right = wider window, down = higher level);
- ``F`` or the *Flicker* button: swap synthetic and aligned training in the first pane; the *Swipe* slider
  shows the aligned training slice over the synthetic one up to a vertical line;
- double-click or *Reset*: back to the anatomy's bounding box (crop to anatomy), full window.

Pixels are drawn nearest-neighbour (``imageSmoothingEnabled = false``) at native resolution. The difference pane
is ``|synthetic − aligned|`` of the displayed intensities, black = identical, through yellow to white at
``window width / gain``.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np

__all__ = ["anatomy_box", "pair_viewer_html"]


def _png_uri(img: np.ndarray) -> str:
    """A float image in [0, 1] (H, W) as an 8-bit grayscale PNG data URI (NaN -> 0)."""
    from PIL import Image

    a = np.clip(np.nan_to_num(np.asarray(img, np.float32), nan=0.0), 0.0, 1.0)
    buf = io.BytesIO()
    Image.fromarray(np.round(a * 255).astype(np.uint8), "L").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def anatomy_box(img: np.ndarray, *, threshold: float = 0.05, margin: int = 4) -> tuple[int, int, int, int]:
    """The bounding box ``(x0, y0, x1, y1)`` (exclusive ends) of the pixels above ``threshold``, with a margin.

    The whole image when nothing exceeds the threshold.
    """
    a = np.nan_to_num(np.asarray(img, np.float32), nan=0.0)
    if a.ndim != 2:
        raise ValueError(f"anatomy_box needs a 2D image; got shape {a.shape}.")
    h, w = a.shape
    ys, xs = np.nonzero(a > threshold)
    if ys.size == 0:
        return 0, 0, w, h
    return (
        max(0, int(xs.min()) - margin),
        max(0, int(ys.min()) - margin),
        min(w, int(xs.max()) + 1 + margin),
        min(h, int(ys.max()) + 1 + margin),
    )


_TEMPLATE = """<!DOCTYPE html><html><head><meta charset="utf-8"><style>
body{margin:0;font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;font-size:13px;color:#ddd;
background:#111}
.bar{display:flex;gap:12px;align-items:center;padding:4px 6px;flex-wrap:wrap}
.bar button{background:#333;color:#eee;border:1px solid #555;border-radius:4px;padding:2px 10px;cursor:pointer}
.panes{display:grid;grid-template-columns:repeat(__NPANES__,1fr);gap:6px;padding:0 6px}
.pane{position:relative}.pane canvas{width:100%;height:__PANE_H__px;background:#000;display:block;cursor:grab}
.pane .cap{position:absolute;left:6px;top:4px;background:rgba(0,0,0,.6);padding:1px 6px;border-radius:3px}
.hint{color:#999}
</style></head><body>
<div class="bar"><button id="reset" type="button">Reset</button><button id="flicker" type="button">Flicker (F)</button>
<label>Swipe <input id="swipe" type="range" min="0" max="100" value="0"></label>
<label>Gain <select id="gain"><option>1</option><option>2</option><option selected>4</option><option>8</option>
</select></label><span id="wl"></span>
<span class="hint">wheel zoom · drag pan · right-drag or Shift-drag window/level · double-click reset</span></div>
<div class="panes" id="panes"></div>
<script>
(function(){
const CFG = __CFG__;
const state = {zoom: 1, cx: 0, cy: 0, low: 0, high: 1, flicker: false, swipe: 0, gain: 4, draws: []};
window.inspectorViewer = state;
const panes = [];
let ready = 0;
function load(uri, cb){ const im = new Image(); im.onload = () => cb(im); im.src = uri; }
const srcs = {};
function pixels(im){
  const c = document.createElement('canvas'); c.width = im.width; c.height = im.height;
  const g = c.getContext('2d'); g.drawImage(im, 0, 0); const d = g.getImageData(0, 0, im.width, im.height).data;
  const out = new Float32Array(im.width * im.height); for (let i = 0; i < out.length; i++) out[i] = d[4 * i] / 255;
  return out;
}
function hot(x){ return [Math.min(1, 3 * x), Math.min(1, Math.max(0, 3 * x - 1)), Math.min(1, Math.max(0, 3 * x - 2))]; }
function render(values, w, h, kind){
  const c = document.createElement('canvas'); c.width = w; c.height = h;
  const g = c.getContext('2d'); const img = g.createImageData(w, h);
  const lo = state.low, span = Math.max(state.high - state.low, 1e-6);
  for (let i = 0; i < w * h; i++) {
    let r, gg, b;
    if (kind === 'diff') { [r, gg, b] = hot(Math.min(1, values[i] / (span / state.gain))); }
    else { const v = Math.min(1, Math.max(0, (values[i] - lo) / span)); r = gg = b = v; }
    img.data[4 * i] = 255 * r; img.data[4 * i + 1] = 255 * gg; img.data[4 * i + 2] = 255 * b; img.data[4 * i + 3] = 255;
  }
  g.putImageData(img, 0, 0); return c;
}
function reset(){
  const [x0, y0, x1, y1] = CFG.box; const p = panes[0].canvas;
  const bw = x1 - x0, bh = y1 - y0;
  state.zoom = Math.min(p.clientWidth / bw, p.clientHeight / bh); state.cx = x0 + bw / 2; state.cy = y0 + bh / 2;
  state.low = 0; state.high = 1; draw();
}
function draw(){
  const S = srcs.syn, A = srcs.ali; if (!S) return;
  const w = CFG.w, h = CFG.h;
  let diff = null;
  if (A) { diff = new Float32Array(w * h); for (let i = 0; i < diff.length; i++) diff[i] = Math.abs(S[i] - A[i]); }
  const first = state.flicker && A ? A : S;
  const layers = {syn: render(first, w, h, 'img'), ali: A ? render(state.flicker ? S : A, w, h, 'img') : null,
                  diff: diff ? render(diff, w, h, 'diff') : null, under: A ? render(state.flicker ? S : A, w, h, 'img') : null};
  state.draws = [];
  for (const p of panes) {
    const c = p.canvas, dpr = window.devicePixelRatio || 1;
    c.width = Math.round(c.clientWidth * dpr); c.height = Math.round(c.clientHeight * dpr);
    const g = c.getContext('2d'); g.imageSmoothingEnabled = false; g.fillStyle = '#000'; g.fillRect(0, 0, c.width, c.height);
    const z = state.zoom * dpr, ox = c.width / 2 - state.cx * z, oy = c.height / 2 - state.cy * z;
    g.setTransform(z, 0, 0, z, ox, oy);
    const src = layers[p.kind]; if (src) g.drawImage(src, 0, 0);
    if (p.kind === 'syn' && layers.under && state.swipe > 0) {
      const sw = w * state.swipe / 100; g.drawImage(layers.under, 0, 0, sw, h, 0, 0, sw, h);
      g.strokeStyle = '#0f0'; g.lineWidth = 1 / z; g.beginPath(); g.moveTo(sw, 0); g.lineTo(sw, h); g.stroke();
    }
    g.setTransform(1, 0, 0, 1, 0, 0);
    state.draws.push({kind: p.kind, zoom: state.zoom, cx: state.cx, cy: state.cy, low: state.low, high: state.high});
    p.cap.textContent = p.kind === 'syn' ? (state.flicker ? CFG.labels.ali + ' (flicker)' : CFG.labels.syn)
      : p.kind === 'ali' ? (state.flicker ? CFG.labels.syn + ' (flicker)' : CFG.labels.ali) : CFG.labels.diff;
  }
  document.getElementById('wl').textContent = 'window ' + state.low.toFixed(2) + '–' + state.high.toFixed(2) +
    ' · zoom ' + state.zoom.toFixed(2) + '×';
}
function addPane(kind){
  const d = document.createElement('div'); d.className = 'pane';
  const c = document.createElement('canvas'); const cap = document.createElement('div'); cap.className = 'cap';
  d.appendChild(c); d.appendChild(cap); document.getElementById('panes').appendChild(d);
  const p = {kind: kind, canvas: c, cap: cap}; panes.push(p);
  c.addEventListener('wheel', e => {
    e.preventDefault(); const r = c.getBoundingClientRect();
    const mx = state.cx + (e.clientX - r.left - r.width / 2) / state.zoom, my = state.cy + (e.clientY - r.top - r.height / 2) / state.zoom;
    const f = Math.exp(-e.deltaY * 0.0015); state.zoom = Math.min(64, Math.max(0.1, state.zoom * f));
    state.cx = mx - (e.clientX - r.left - r.width / 2) / state.zoom; state.cy = my - (e.clientY - r.top - r.height / 2) / state.zoom;
    draw();
  }, {passive: false});
  c.addEventListener('contextmenu', e => e.preventDefault());
  c.addEventListener('dblclick', () => reset());
  c.addEventListener('pointerdown', e => {
    c.setPointerCapture(e.pointerId); const wl = e.button === 2 || e.shiftKey;
    let lx = e.clientX, ly = e.clientY;
    const move = ev => {
      const dx = ev.clientX - lx, dy = ev.clientY - ly; lx = ev.clientX; ly = ev.clientY;
      if (wl) {
        const width = Math.max(0.01, (state.high - state.low) + dx / 300), level = (state.high + state.low) / 2 + dy / 300;
        state.low = level - width / 2; state.high = level + width / 2;
      } else { state.cx -= dx / state.zoom; state.cy -= dy / state.zoom; }
      draw();
    };
    const up = () => { c.removeEventListener('pointermove', move); c.removeEventListener('pointerup', up); };
    c.addEventListener('pointermove', move); c.addEventListener('pointerup', up);
  });
}
for (const k of CFG.panes) addPane(k);
document.getElementById('reset').onclick = reset;
document.getElementById('flicker').onclick = () => { state.flicker = !state.flicker; draw(); };
document.getElementById('swipe').oninput = e => { state.swipe = +e.target.value; draw(); };
document.getElementById('gain').onchange = e => { state.gain = +e.target.value; draw(); };
document.addEventListener('keydown', e => { if (e.key === 'f' || e.key === 'F') { state.flicker = !state.flicker; draw(); } });
window.addEventListener('resize', draw);
load(CFG.syn, im => { srcs.syn = pixels(im); if (++ready === CFG.n) reset(); });
if (CFG.ali) load(CFG.ali, im => { srcs.ali = pixels(im); if (++ready === CFG.n) reset(); });
})();
</script></body></html>"""  # noqa: E501


def pair_viewer_html(
    synthetic: np.ndarray,
    aligned: np.ndarray | None,
    *,
    labels: tuple[str, str, str] = ("synthetic", "aligned training", "|synthetic − aligned|"),
    pane_height: int = 440,
) -> str:
    """The self-contained viewer document for one pair (see the module docstring).

    Parameters
    ----------
    synthetic : np.ndarray, shape (H, W)
        Intensities in [0, 1].
    aligned : np.ndarray, shape (H, W), optional
        The training slice registered onto the synthetic one (paper mode: the nearest slice, or None).
    labels : tuple of str
        Captions of the three panes (pseudonymous labels only; they are escaped).
    pane_height : int
        CSS pixels of each pane (440 keeps the viewer above the fold on a 1366×768 laptop).

    Returns
    -------
    str
        An HTML document: inline script and style, images as data URIs, no network access.
    """
    s = np.asarray(synthetic, np.float32)
    if s.ndim != 2:
        raise ValueError(f"synthetic must be a 2D image; got shape {s.shape}.")
    a = None if aligned is None else np.asarray(aligned, np.float32)
    if a is not None and a.shape != s.shape:
        raise ValueError(f"aligned has shape {a.shape}; it must match the synthetic slice's {s.shape}.")
    if pane_height < 100:
        raise ValueError(f"pane_height must be at least 100 px; got {pane_height}.")
    kinds = ["syn", "ali", "diff"] if a is not None else ["syn"]
    cfg = {
        "syn": _png_uri(s),
        "ali": _png_uri(a) if a is not None else None,
        "n": 2 if a is not None else 1,
        "w": int(s.shape[1]),
        "h": int(s.shape[0]),
        "box": list(anatomy_box(s)),
        "panes": kinds,
        "labels": {"syn": labels[0], "ali": labels[1], "diff": labels[2]},
    }
    # JSON inside a <script>: escape "</" so a label can never close the script element
    blob = json.dumps(cfg).replace("</", "<\\/")
    out = _TEMPLATE.replace("__CFG__", blob).replace("__NPANES__", str(len(kinds)))
    return out.replace("__PANE_H__", str(int(pane_height)))
