"""Demo checkpoint, sampling and the streaming generator."""

from __future__ import annotations

import threading

import pytest
import torch

from model import Generation, GenerationSettings, SamplingParams, load_model
from model.demo import DEMO_NOTICE, is_demo_checkpoint, main
from model.sampling import InvalidLogits, Sampler, filtered_probabilities


@pytest.fixture(scope="module")
def demo_lm(demo_checkpoint):
    return load_model(demo_checkpoint, dtype=torch.float32)


def prompt(lm, question: str) -> list[int]:
    tok = lm.tokenizer
    return tok.turn("system", "You are helpful.") + tok.turn("user", question) + tok.generation_prompt()


def test_demo_checkpoint_is_marked_and_loads(demo_checkpoint, demo_lm):
    assert is_demo_checkpoint(demo_checkpoint)
    assert demo_lm.config.vocab_size == 151936
    assert demo_lm.tokenizer.im_end_id == 151645


def test_demo_command_says_answers_are_meaningless(tmp_path, capsys):
    assert main([str(tmp_path / "d"), "--seed", "3"]) == 0
    assert DEMO_NOTICE in capsys.readouterr().err
    assert is_demo_checkpoint(tmp_path / "d")


def test_generation_streams_text(demo_lm):
    settings = GenerationSettings(max_new_tokens=12)
    generation = Generation(demo_lm, demo_lm.new_state(), prompt(demo_lm, "Hello?"), settings)
    deltas = list(generation)
    result = generation.result
    assert len(result.token_ids) == 12 and result.finish_reason == "length"
    assert "".join(d.text for d in deltas if d.channel == "answer") == result.text
    assert result.text == demo_lm.tokenizer.decode(result.token_ids)
    assert result.time_to_first_token_s > 0


def test_greedy_is_deterministic_and_state_accounts_for_tokens(demo_lm):
    ids = prompt(demo_lm, "Same question")
    settings = GenerationSettings(max_new_tokens=8)
    state = demo_lm.new_state()
    first = Generation(demo_lm, state, ids, settings).run()
    second = Generation(demo_lm, demo_lm.new_state(), ids, settings).run()
    assert first.token_ids == second.token_ids
    # Every sampled token but the last was fed back through the model.
    assert state.seen_tokens == len(ids) + len(first.token_ids) - 1


def test_seeded_sampling_reproduces(demo_lm):
    ids = prompt(demo_lm, "Sample me")
    sampling = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, min_p=0.01, repetition_penalty=1.1, seed=42)
    settings = GenerationSettings(sampling=sampling, max_new_tokens=10)
    a = Generation(demo_lm, demo_lm.new_state(), ids, settings).run()
    b = Generation(demo_lm, demo_lm.new_state(), ids, settings).run()
    assert a.token_ids == b.token_ids


def test_cancellation_stops_before_prefill(demo_lm):
    cancel = threading.Event()
    cancel.set()
    generation = Generation(demo_lm, demo_lm.new_state(), prompt(demo_lm, "x"), cancel=cancel)
    assert list(generation) == []
    assert generation.result.finish_reason == "cancelled"


def test_cancellation_during_decode(demo_lm):
    cancel = threading.Event()
    generation = Generation(demo_lm, demo_lm.new_state(), prompt(demo_lm, "y"),
                            GenerationSettings(max_new_tokens=50), cancel=cancel)
    for _ in generation:
        cancel.set()
    assert generation.result.finish_reason == "cancelled"
    assert len(generation.result.token_ids) < 50


class ScriptedModel:
    """Wraps a real model but forces the tokens it "predicts", to drive stop handling."""

    extra_tensors: dict = {}  # no MTP block

    def __init__(self, lm, script: list[int]):
        self._lm, self.script = lm, list(script)
        self.config, self.device, self.tokenizer = lm.config, lm.device, lm.tokenizer

    def forward(self, ids, state, last_only=False):
        logits = self._lm.forward(ids, state, last_only=True)
        forced = torch.full_like(logits, -1e9)
        forced[..., self.script.pop(0)] = 0.0
        return forced


def test_stops_on_im_end_and_routes_thinking(demo_lm):
    tok = demo_lm.tokenizer
    script = [tok.encode("plan")[0], tok.think_end_id, *tok.encode(" Answer"), tok.im_end_id]
    scripted = ScriptedModel(demo_lm, script)
    generation = Generation(scripted, demo_lm.new_state(), prompt(demo_lm, "q"),
                            GenerationSettings(thinking=True, max_new_tokens=20))
    deltas = list(generation)
    assert generation.result.reasoning == "plan"
    assert generation.result.text == " Answer"
    assert generation.result.finish_reason == "stop"
    assert {d.channel for d in deltas} == {"reasoning", "answer"}


def test_stop_string_cuts_the_answer(demo_lm):
    tok = demo_lm.tokenizer
    script = tok.encode("one two STOP three four")
    scripted = ScriptedModel(demo_lm, script)
    result = Generation(scripted, demo_lm.new_state(), prompt(demo_lm, "q"),
                        GenerationSettings(stop_strings=("STOP",), max_new_tokens=20)).run()
    assert result.text == "one two "
    assert result.finish_reason == "stop"


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_scores_that_are_not_numbers_end_the_answer_with_a_clear_error(demo_checkpoint, temperature):
    """Damaged weights (here NaN in the final norm) give NaN scores: the answer stops with a message
    a person can act on, instead of streaming the first token id over and over."""
    lm = load_model(demo_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        lm.module.model.norm.weight.fill_(float("nan"))
    settings = GenerationSettings(max_new_tokens=4, sampling=SamplingParams(temperature=temperature, seed=1))
    generation = Generation(lm, lm.new_state(), prompt(lm, "Hello?"), settings)
    with pytest.raises(InvalidLogits, match="weights may be damaged"):
        list(generation)


@pytest.mark.parametrize("params,kept", [
    (SamplingParams(temperature=1.0, top_k=2), 2),
    (SamplingParams(temperature=1.0, top_p=0.5), 1),
    (SamplingParams(temperature=1.0, min_p=0.4), 2),
], ids=["top_k2", "top_p0.5", "min_p0.4"])
def test_filters_keep_expected_tokens(params, kept):
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = filtered_probabilities(logits, params)
    assert int((probs > 0).sum()) == kept
    assert torch.isclose(probs.sum(), torch.tensor(1.0))


def test_repetition_penalty_demotes_seen_tokens():
    sampler = Sampler(SamplingParams(repetition_penalty=2.0))
    logits = torch.tensor([1.0, 0.9, -1.0])
    assert sampler.sample(logits, torch.tensor([0])) == 1


def test_command_line_streams_a_completion(demo_checkpoint, tmp_path, capsys):
    from model.generate import main as generate_main

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Summarise the contract.", encoding="utf-8")
    code = generate_main(["--model", str(demo_checkpoint), "--prompt-file", str(prompt_file),
                          "--max-new-tokens", "5", "--dtype", "fp32"])
    captured = capsys.readouterr()
    assert code == 0
    assert "5 generated" in captured.err and "tokens/s" in captured.err
    assert DEMO_NOTICE in captured.err


def test_command_line_quantizes_on_request(demo_checkpoint, tmp_path, capsys):
    from model.generate import main as generate_main

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Summarise the contract.", encoding="utf-8")
    code = generate_main(["--model", str(demo_checkpoint), "--prompt-file", str(prompt_file),
                          "--max-new-tokens", "3", "--weights", "int4"])
    assert code == 0 and "3 generated" in capsys.readouterr().err


def test_app_setting_weights_reaches_the_model(demo_checkpoint, tmp_path, monkeypatch):
    from app.services.container import build_services
    from app.settings import load_settings

    monkeypatch.setenv("DOCANALYST_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DOCANALYST_MODEL", str(demo_checkpoint))
    monkeypatch.setenv("DOCANALYST_WEIGHTS", "int8")
    info = build_services(load_settings()).analysis.model_info()
    assert "int8" in info.weight_formats


def test_command_line_reports_a_bad_folder(tmp_path, capsys):
    from model.generate import main as generate_main

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("x", encoding="utf-8")
    assert generate_main(["--model", str(tmp_path), "--prompt-file", str(prompt_file)]) == 2
    assert "No config.json" in capsys.readouterr().err
