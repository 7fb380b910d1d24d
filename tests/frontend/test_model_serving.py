"""Served names, chat template and generation config as the frontend applies them."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tandem.engine.model_info import describe_model
from tandem.engine.tokenizer import apply_chat_template, load_tokenizer
from tandem.frontend.model_serving import (ModelServingConfig, generation_defaults,
                                           load_chat_template, serve_model, served_names)
from tandem.frontend.request_rules import RequestError, RequestRules, check_model

TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"


def test_served_names_default_to_the_model_and_any_of_them_is_accepted():
    assert served_names(ModelServingConfig(), "random:tiny") == ("random:tiny",)
    names = served_names(ModelServingConfig(served_model_names=("a", "b")), "random:tiny")
    assert names == ("a", "b")
    rules = replace(RequestRules("a", 64, 100, 1000), served_model_names=names)
    for requested in ("a", "b", None, ""):
        check_model(requested, rules)
    with pytest.raises(RequestError, match="serves `a`, `b`") as err:
        check_model("random:tiny", rules)
    assert (err.value.code, err.value.status) == ("model_not_found", 404)
    with pytest.raises(ValueError, match="non-empty"):
        ModelServingConfig(served_model_names=("a", " "))


def test_chat_template_from_a_file_or_inline_replaces_the_tokenizers(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE == load_chat_template(TEMPLATE)
    tokenizer = load_tokenizer(None)
    serve_model(ModelServingConfig(chat_template=str(path)), describe_model("random:tiny"),
                tokenizer)
    ids = apply_chat_template(tokenizer, [{"role": "user", "content": "hi"}])
    assert tokenizer.decode(ids) == "<|bos|>[user] hi"
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_generation_config_auto_neutral_or_a_file(tmp_path):
    model = replace(describe_model("random:tiny"),
                    generation_defaults={"temperature": 0.6, "top_p": 0.9})
    assert generation_defaults(ModelServingConfig(), model) == {"temperature": 0.6, "top_p": 0.9}
    assert generation_defaults(ModelServingConfig(generation_config="vllm"), model) == {}
    assert generation_defaults(ModelServingConfig(generation_config="none"), model) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 5}))
    for source in (str(tmp_path), str(tmp_path / "generation_config.json")):
        served = serve_model(ModelServingConfig(generation_config=source), model,
                             load_tokenizer(None))
        assert served.generation_defaults == {"temperature": 0.3, "top_k": 5}
        params = served.default_sampling_params()
        assert (params.temperature, params.top_k, params.top_p) == (0.3, 5, 1.0)
    neutral = serve_model(ModelServingConfig(generation_config="vllm"), model,
                          load_tokenizer(None))
    assert neutral.default_sampling_params().temperature == 1.0
    assert neutral.config.eos_token_ids == model.config.eos_token_ids  # stop tokens stay
