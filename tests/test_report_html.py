"""The self-contained HTML audit page: parsed back with the standard library's html.parser."""

from __future__ import annotations

import math
from html.parser import HTMLParser
from typing import Any

import numpy as np
import pytest
import torch

from memsurgery.report_html import NEG_COLOR, POS_COLOR, render_html, write_html

LAYERS = ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1", "fc"]
UNIT_LAYERS = ["layer2.1", "layer3.1", "layer4.1"]
CLASSES = ["airplane", "automobile", "bird", "<script>", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_record(mode: str = "twin", seed: int = 0) -> dict[str, Any]:
    """A realistic audit record: 10 layers, 3 unit layers of 64 units (some None), 16 top points
    with 16x16 RGB images (one 8x8 grayscale), 8 top units."""
    rng = np.random.default_rng(seed)
    lm = np.cumsum(rng.uniform(0.0, 0.03, len(LAYERS)))
    lm[2] = -0.012  # one negative LayerMem point
    delta = np.diff(lm, prepend=0.0)
    lv: dict[str, dict[str, float]]
    if mode == "twin":
        lv = {"layermem": dict(zip(LAYERS, lm.tolist(), strict=True)), "delta_layermem": dict(zip(LAYERS, delta.tolist(), strict=True)),
              "layermem_corrected": dict(zip(LAYERS, (lm - 0.005).tolist(), strict=True))}
    else:
        lv = {"layermem_est": dict(zip(LAYERS, lm.tolist(), strict=True))}
    unitmem: dict[str, list[float | None]] = {}
    for j, name in enumerate(UNIT_LAYERS):
        vals: list[float | None] = rng.beta(2, 5 - j, 64).tolist()
        for k in range(j + 1):  # 1, 2, 3 invalid units
            vals[5 + 7 * k] = None
        unitmem[name] = vals
    unitmem["layer4.1"][0] = 1.3  # outside [0, 1]: clipped to the last bin
    keys = rng.choice(5000, 16, replace=False).tolist()
    points = []
    for r, key in enumerate(keys):
        label = int(rng.integers(10))
        points.append({"key": key, "index": key, "source": "train", "file": f"{CLASSES[label]}/{key:04d}.jpg",
                       "label": label, "class": CLASSES[label], "score": float(0.3 - 0.01 * r)})
    points[3]["class"], points[3]["label"] = "<script>", 3
    points[5]["file"] = None
    images: dict[int, Any] = {k: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for k in keys}
    images[keys[1]] = rng.integers(0, 256, (8, 8), dtype=np.uint8)  # grayscale
    images[keys[2]] = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)  # tensor, CHW
    unit_keys = rng.choice(5000, 8, replace=False).tolist()
    unit_keys[0] = keys[0]  # one unit memorizes the top point
    top_units = [{"layer": UNIT_LAYERS[i % 3], "unit": int(rng.integers(64)), "unitmem": float(0.95 - 0.02 * i), "key": k}
                 for i, k in enumerate(unit_keys)]
    for k in unit_keys[1:]:
        images[k] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    md = "| layer | LayerMem |\n|---|---|\n" + "\n".join(f"| {n} | {v:.3f} |" for n, v in zip(LAYERS, lm, strict=True))
    return {
        "title": "memsurgery audit: resnet18",
        "subtitle": "f = runs/f.pt vs g = runs/g.pt, 500 candidates, CIFAR-10 (JPEG copy)",
        "mode": mode,
        "inputs": {"f": "runs/f.pt", "f_sha256": "ab" * 32, "g": "runs/g.pt", "data": "cifar10 <jpeg>"},
        "options": {"distance": "l2", "views": 10, "unit": {"reduction": "mean", "activation": "raw"}},
        "layers": LAYERS,
        "layer_values": lv,
        "splits": {"candidates": 0.081, "shared": 0.025, "independent": 0.002, "extra": float("nan")},
        "tests": {"candidates>shared": 4e-07, "shared>independent": 0.21},
        "unitmem": unitmem,
        "classmem": {UNIT_LAYERS[0]: rng.beta(2, 3, 64).tolist()},
        "top_points": points,
        "top_units": top_units,
        "images": images,
        "summary_md": "## LayerMem\n" + md,
    }


class Page(HTMLParser):
    """Tags (with attributes and the enclosing svg's data-chart / data-layer) and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str], str | None]] = []
        self.text: list[str] = []
        self.svg: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "svg":
            self.svg = a.get("data-chart") or a.get("data-layer")
        self.tags.append((tag, a, self.svg))

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.svg = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, svg: str | None = None, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a, s in self.tags if t == tag and (svg is None or s == svg)
                and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    @property
    def all_text(self) -> str:
        return " ".join(self.text)


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    return page


@pytest.fixture(scope="module")
def twin() -> tuple[dict[str, Any], str, Page]:
    record = make_record("twin")
    html = render_html(record)
    return record, html, parse(html)


def test_write_html_creates_file(tmp_path):
    record = make_record("twin")
    out = write_html(record, tmp_path / "audit" / "report.html")
    assert out.exists() and out.name == "report.html"
    html = out.read_text(encoding="utf-8")
    assert html == render_html(record) and html.startswith("<!DOCTYPE html>")


def test_self_contained(twin):
    _, html, page = twin
    refs = [(t, k, v) for t, a, _ in page.tags for k, v in a.items() if k in ("src", "href", "xlink:href", "srcset", "action")]
    assert refs and all(v.startswith(("data:", "#")) for _, _, v in refs)
    assert not page.find("script") and not page.find("link") and not page.find("iframe")
    assert "url(" not in html and "@import" not in html
    assert html.count("http") == html.count('xmlns="http://www.w3.org/2000/svg"')


def test_sections_in_order(twin):
    _, html, _ = twin
    ids = ["profile", "units", "points", "units-top", "splits", "summary", "provenance", "options"]
    positions = [html.index(f'<section id="{i}">') for i in ids]
    assert positions == sorted(positions)
    assert html.index("twin reference g") < positions[0]


def test_top_points_and_images(twin):
    record, _, page = twin
    text = page.all_text
    for p in record["top_points"]:
        assert f"index {p['index']}" in text
        assert f"class {p['class']}" in text
    imgs = page.find("img")
    assert len(imgs) == len(record["top_points"]) + len(record["top_units"])
    assert all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    assert all(int(a["width"]) == 96 or int(a["width"]) == 72 for a in imgs)  # small images upscaled


def test_top_units_table(twin):
    record, _, page = twin
    text = page.all_text
    for u in record["top_units"]:
        assert u["layer"] in text and f"{u['unitmem']:.3g}" in text
    first = record["top_points"][0]
    assert first["class"] in text


def test_profile_bars(twin):
    record, _, page = twin
    bars = page.find("rect", svg="layermem", **{"class": "bar"})
    assert [b["data-layer"] for b in bars] == LAYERS
    values = record["layer_values"]["layermem"]
    for b in bars:
        v = values[b["data-layer"]]
        assert float(b["data-value"]) == pytest.approx(v)
        assert b["fill"] == (NEG_COLOR if v < 0 else POS_COLOR)
    assert bars[2]["fill"] == NEG_COLOR
    ratios = [float(b["height"]) / abs(values[b["data-layer"]]) for b in bars]
    assert max(ratios) == pytest.approx(min(ratios), rel=0.02)
    # the negative bar starts at the zero line and goes down; positive bars end on it
    zero = float(page.find("line", svg="layermem", **{"class": "zero"})[0]["y1"])
    assert float(bars[2]["y"]) == pytest.approx(zero, abs=0.01)
    assert float(bars[0]["y"]) + float(bars[0]["height"]) == pytest.approx(zero, abs=0.01)
    ticks = [t for t, a, s in page.tags if s == "layermem" and a.get("class") == "tick"]
    assert len(ticks) >= 3
    assert page.find("polyline", svg="layermem", data_series="layermem_corrected")
    assert len(page.find("rect", svg="delta_layermem", **{"class": "bar"})) == len(LAYERS)


def test_histogram_counts(twin):
    record, _html, page = twin
    for layer, vals in record["unitmem"].items():
        valid = sum(v is not None and math.isfinite(v) for v in vals)
        rects = page.find("rect", svg=layer, data_series="unitmem")
        assert len(rects) == 20
        assert sum(int(r["data-count"]) for r in rects) == valid
        assert f"{len(vals) - valid} invalid" in page.all_text
    last = page.find("rect", svg="layer4.1", data_series="unitmem")[-1]
    assert int(last["data-count"]) >= 1  # 1.3 clipped into the last bin
    assert "1 outside [0, 1] (clipped)" in page.all_text
    cm = page.find("polyline", svg=UNIT_LAYERS[0], data_series="classmem")
    assert sum(int(c) for c in cm[0]["data-counts"].split(",")) == 64
    assert "ClassMem" in page.all_text and "median" in page.all_text


def test_escaping_and_dashes(twin):
    _, html, page = twin
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert "class <script>" in page.all_text  # the parser unescapes it back to text
    assert "cifar10 &lt;jpeg&gt;" in html
    caption = page.all_text
    assert "–" in caption
    # the point with file None shows a dash where the file goes; the NaN split too
    assert 'class="mono">–</div>' in html
    assert "<td>extra</td><td class=\"num\">–</td>" in html


def test_splits_tests_summary_provenance(twin):
    _, html, page = twin
    text = page.all_text
    assert "candidates > shared" in text and "4.0e-07" in text and "0.210" in text
    assert page.find("th") and "<th>layer</th><th>LayerMem</th>" in html  # markdown table converted
    assert "ab" * 32 in text
    assert page.find("details") and "&quot;reduction&quot;: &quot;mean&quot;" in html


def test_single_mode():
    record = make_record("single")
    page = parse(render_html(record))
    assert "single-encoder estimate" in page.all_text
    bars = page.find("rect", svg="layermem_est", **{"class": "bar"})
    assert len(bars) == len(LAYERS) and bars[2]["fill"] == NEG_COLOR
    assert not page.find("svg", data_chart="delta_layermem")


def test_minimal_record_omits_missing_parts(tmp_path):
    page = parse(write_html({"title": "empty <audit>"}, tmp_path / "r.html").read_text(encoding="utf-8"))
    assert not page.find("section") and not page.find("svg") and not page.find("img")
    assert "empty <audit>" in page.all_text
    partial = make_record("twin")
    for key in ("splits", "tests", "classmem", "top_units", "summary_md", "options", "inputs"):
        del partial[key]
    partial["layer_values"] = {"delta_layermem": partial["layer_values"]["delta_layermem"]}
    del partial["images"][partial["top_points"][0]["key"]]
    page = parse(render_html(partial))
    assert [a["id"] for a in page.find("section")] == ["profile", "units", "points"]
    assert len(page.find("img")) == len(partial["top_points"]) - 1 and "no image" in page.all_text


def test_json_keys_nan_arrays_and_float_images():
    record = make_record("twin")
    record["images"] = {str(k): v for k, v in record["images"].items()}  # JSON round trip
    k0 = record["top_points"][0]["key"]
    record["images"][str(k0)] = np.random.default_rng(1).random((3, 32, 32)).astype(np.float32)
    record["layer_values"]["layermem"]["fc"] = float("nan")
    record["unitmem"]["layer3.1"] = np.array([0.1, np.nan, 0.5, 0.99], dtype=np.float32)
    record["unitmem"]["layer4.1"] = torch.tensor([0.2, float("nan"), 0.4])
    page = parse(render_html(record))
    for layer, valid in (("layer3.1", 3), ("layer4.1", 2)):
        assert sum(int(r["data-count"]) for r in page.find("rect", svg=layer, data_series="unitmem")) == valid
    assert len(page.find("img")) == len(record["top_points"]) + len(record["top_units"])
    fc = page.find("rect", svg="layermem", data_layer="fc")[0]
    assert float(fc["height"]) == 0.0


@pytest.mark.parametrize("n", [10, 40])
def test_many_layers_widen_instead_of_overlap(n):
    layers = [f"blocks.{i}.attn" for i in range(n)]
    values = {name: (i - 5) * 0.01 for i, name in enumerate(layers)}
    page = parse(render_html({"title": "t", "layers": layers, "layer_values": {"layermem": values}}))
    svg = page.find("svg", data_chart="layermem")[0]
    bars = page.find("rect", svg="layermem", **{"class": "bar"})
    xs = [float(b["x"]) for b in bars]
    assert len(bars) == n and min(np.diff(xs)) >= 26 - 1e-6  # at least 26 px per layer: rotated labels fit
    assert float(svg["width"]) >= n * 26
    labels = [a for t, a, s in page.tags if s == "layermem" and a.get("class") == "layer-label"]
    assert len(labels) == n
    rotated = ["rotate(-45" in a.get("transform", "") for a in labels]
    assert all(rotated) or (not any(rotated) and min(np.diff(xs)) >= len(layers[-1]) * 7)  # rotated or room enough
    assert all(rotated) == (n == 40)
