"""The web router alone, in a minimal FastAPI app with a hand-built `app.state.ctx` (no model, no engine)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gpt2serve.accounts.pricing import Pricing
from gpt2serve.api.settings import Settings
from gpt2serve.web import facts
from gpt2serve.web.routes import STATIC_DIR, router

# Parameter counts of the released checkpoints (HF GPT2LMHeadModel, tied lm_head counted once).
GPT2_124M = 124_439_808
GPT2_355M = 354_823_168


class FakeEngine:
    def stats(self):
        return {"running": 2, "waiting": 5, "kv_blocks_free": 10}


def make_app(n_layer=12, n_head=12, n_embd=768, num_parameters=GPT2_124M, name="gpt2", billing=None, **settings):
    app = FastAPI()
    app.include_router(router)
    config = SimpleNamespace(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=1024, vocab_size=50257)
    loaded = SimpleNamespace(name=name, config=config, num_parameters=num_parameters, random_weights=True,
                             dtype="torch.float32", device="cpu")
    app.state.ctx = SimpleNamespace(settings=Settings(**settings), loaded=loaded, engine=FakeEngine(), billing=billing)
    return app


def page_info(app) -> dict:
    with TestClient(app) as client:
        r = client.get("/v1/page-info")
    assert r.status_code == 200
    return r.json()


def test_index_is_the_model_page_with_local_assets_only():
    with TestClient(make_app()) as client:
        r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "openai-community/gpt2" in html
    for section in ("overview", "pricing", "zero-shot", "get-key", "playground", "code", "faq"):
        assert f'id="{section}"' in html
    # No CDN: every script and stylesheet comes from this server.
    assets = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/static/") for a in assets), assets


def test_every_form_control_has_a_label():
    html = (STATIC_DIR / "index.html").read_text()
    ids = re.findall(r'<(?:input|textarea|select)[^>]*\bid="([^"]+)"', html)
    for control_id in ids:
        wrapped = re.search(rf'<label[^>]*>\s*<input[^>]*id="{control_id}"', html)
        assert f'for="{control_id}"' in html or wrapped, f"#{control_id} has no label"


def test_static_assets_served_from_the_package():
    with TestClient(make_app()) as client:
        js = client.get("/static/app.js")
        css = client.get("/static/style.css")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert js.text == (STATIC_DIR / "app.js").read_text()
        # ETag revalidation works (StaticFiles answers 304).
        assert client.get("/static/app.js", headers={"If-None-Match": js.headers["etag"]}).status_code == 304
        assert client.get("/static/missing.js").status_code == 404
        # No escape from the static folder.
        assert client.get("/static/../routes.py").status_code == 404
        assert client.get("/static/%2e%2e/routes.py").status_code == 404


def test_page_info_for_124m():
    info = page_info(make_app())
    m = info["model"]
    assert m["parameters"] == "124M" and m["num_parameters"] == GPT2_124M
    assert m["hub_id"] == "openai-community/gpt2" and m["id"] == "gpt2"
    assert (m["context_length"], m["vocab_size"], m["n_layer"], m["n_head"], m["n_embd"]) == (1024, 50257, 12, 12, 768)
    assert m["architecture"] == "decoder-only transformer" and m["task"] == "text-generation"
    assert m["licence"]["name"] == "MIT"
    assert m["dtype"] == "float32" and m["random_weights"] is True
    zs = info["zero_shot"]
    assert zs["size"] == "124M"
    lambada_acc = next(r for r in zs["rows"] if r["task"] == "lambada_acc")
    assert lambada_acc["published_this"] == 45.99 and lambada_acc["measured"] is None
    assert zs["report"] is None
    assert info["status"] == {"status": "ok", "random_weights": True, "running": 2, "waiting": 5}


def test_page_info_for_gpt2_medium_reads_the_loaded_model():
    info = page_info(make_app(n_layer=24, n_head=16, n_embd=1024, num_parameters=GPT2_355M, name="gpt2-medium"))
    assert info["model"]["parameters"] == "355M"
    assert info["model"]["hub_id"] == "openai-community/gpt2-medium"
    assert info["zero_shot"]["size"] == "355M"
    wikitext2 = next(r for r in info["zero_shot"]["rows"] if r["task"] == "wikitext2")
    assert wikitext2["published_this"] == 22.76


def test_page_info_for_a_tiny_random_model():
    info = page_info(make_app(n_layer=2, n_head=2, n_embd=64, num_parameters=3_380_000, name="tiny"))
    assert info["model"]["parameters"] == "3M"
    assert info["model"]["size"] is None and info["zero_shot"]["size"] is None


def test_served_model_name_is_the_api_id():
    info = page_info(make_app(served_model_name="my-gpt2"))
    assert info["model"]["id"] == "my-gpt2" and info["model"]["name"] == "gpt2"


def test_pricing_and_signup():
    info = page_info(make_app(price_prompt_micros=3, price_completion_micros=7, starter_credit_micros=2_500_000))
    assert info["pricing"] == {"billed": True, "prompt": "0.000003", "completion": "0.000007",
                               "prompt_per_million_usd": "3", "completion_per_million_usd": "7"}
    assert info["signup"] == {"enabled": True, "starter_credit_micros": 2_500_000, "starter_credit_usd": "2.5"}
    # The billing object's prices are the ones in force.
    info = page_info(make_app(billing=SimpleNamespace(pricing=Pricing(5, 10))))
    assert (info["pricing"]["prompt"], info["pricing"]["completion"]) == ("0.000005", "0.00001")
    # Without auth nothing is billed and there is no sign-up.
    info = page_info(make_app(auth=False))
    assert info["pricing"]["billed"] is False and info["signup"]["enabled"] is False and info["auth"] is False
    assert page_info(make_app(signup_enabled=False))["signup"]["enabled"] is False


def test_status_while_loading():
    app = make_app()
    app.state.ctx.loaded = None
    app.state.ctx.engine = None
    info = page_info(app)
    assert info["status"]["status"] == "loading"
    assert info["model"]["parameters"] is None


@pytest.mark.parametrize(
    "report",
    [
        # gpt2serve eval's layout: task -> metric -> value (accuracy as a fraction)
        {"model": "gpt2", "results": {"lambada": {"acc": 0.4312, "ppl": 40.5}, "wikitext2": {"ppl": 30.25}}},
        # a list of records, accuracy in percent
        {"results": [{"task": "lambada", "metric": "acc", "value": 43.12}, {"task": "lambada", "metric": "ppl", "value": 40.5},
                     {"task": "wikitext2", "metric": "ppl", "value": 30.25}]},
        # flat keys
        {"lambada_acc": 0.4312, "lambada_ppl": 40.5, "wikitext2_ppl": 30.25, "lambada_acc_stderr": 0.007},
    ],
)
def test_measured_numbers_from_an_eval_report(tmp_path, report):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    info = page_info(make_app(eval_report=str(path)))
    rows = {r["task"]: r for r in info["zero_shot"]["rows"]}
    assert rows["lambada_acc"]["measured"] == pytest.approx(43.12)
    assert rows["lambada_ppl"]["measured"] == pytest.approx(40.5)
    assert rows["wikitext2"]["measured"] == pytest.approx(30.25)
    assert rows["ptb"]["measured"] is None
    assert info["zero_shot"]["report"]["path"] == "report.json"


def test_a_missing_or_broken_eval_report_leaves_the_page_up(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path in (str(bad), str(tmp_path / "absent.json")):
        info = page_info(make_app(eval_report=path))
        assert info["zero_shot"]["report"] is None
        assert all(r["measured"] is None for r in info["zero_shot"]["rows"])


@pytest.mark.parametrize("n,text", [(GPT2_124M, "124M"), (GPT2_355M, "355M"), (774_030_080, "774M"),
                                    (1_557_611_200, "1.6B"), (98_304, "98K"), (512, "512")])
def test_format_parameters(n, text):
    assert facts.format_parameters(n) == text


def test_published_table_agrees_with_the_eval_package():
    from gpt2serve.eval import published  # the eval wing keeps its own copy; web imports nothing above it
    names = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1.5B": "gpt2-xl"}
    keys = [("lambada", "ppl"), ("lambada", "acc"), ("cbt-cn", "acc"), ("cbt-ne", "acc"), ("wikitext2", "ppl"),
            ("ptb", "ppl"), ("enwik8", "bpb"), ("text8", "bpc"), ("wikitext103", "ppl"), ("1bw", "ppl")]
    for size, values in facts.PUBLISHED.items():
        assert [published.PUBLISHED[names[size]][k] for k in keys] == values


def test_measured_numbers_from_gpt2serve_eval_output(tmp_path):
    """The exact JSON `gpt2serve eval --output` writes (eval/cli.py), built with the eval package's own
    table code; a random-weights run has accuracies near 0 %, which must not be read as fractions."""
    from gpt2serve.eval.report import comparison_rows, markdown_table

    results = {
        "lambada": {"metrics": {"acc": 0.5, "ppl": 81234.5, "ppl_token": 50111.0}, "info": {"examples": 200},
                    "timing": {}, "data": "lambada.jsonl", "limit": 200},
        "wikitext2": {"metrics": {"nll": 1e6, "ppl_token": 50000.0, "ppl": 70000.25}, "info": {}, "timing": {},
                      "data": "wiki.test.raw", "limit": 200},
    }
    rows = comparison_rows(results, "gpt2")
    report = {"model": "random:gpt2", "backend": "engine", "api": None, "published_row": "gpt2", "limit": 200,
              "seconds": 12.5, "tasks": results, "table": rows, "markdown": markdown_table(rows, "gpt2")}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(report))
    info = page_info(make_app(eval_report=str(path)))
    rows_by_task = {r["task"]: r for r in info["zero_shot"]["rows"]}
    assert rows_by_task["lambada_acc"]["measured"] == 0.5
    assert rows_by_task["lambada_ppl"]["measured"] == 81234.5
    assert rows_by_task["wikitext2"]["measured"] == 70000.25
    assert rows_by_task["lambada_acc"]["published_this"] == 45.99
    assert info["zero_shot"]["report"] == {"path": "eval.json", "model": "random:gpt2", "backend": "engine",
                                           "limit": 200, "random_weights": True}
    assert info["zero_shot"]["measured_random_weights"] is True
