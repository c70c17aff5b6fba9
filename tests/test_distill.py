"""The distillation trainer and CLI on tiny models: KL to the teacher goes down for each trainable
set, the student keeps its quantization grid and reloads bit-exactly, facts mixing keeps an edit,
resume reproduces an uninterrupted run, and bad inputs fail before anything is written."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from editcomp import checkpoint
from editcomp.cli import cli
from editcomp.data import Fact, FactLang, token_windows
from editcomp.distill import DistillConfig, DistillData, build_data, distill
from editcomp.distill.trainables import STELinear, _Trainables
from editcomp.distill.trainer import fact_sequences
from editcomp.errors import CheckpointError, ConfigError, NumericalError
from editcomp.eval import kl_to_teacher
from editcomp.quant.checkpoint_io import save_quantized
from editcomp.quant.pipeline import QuantizeConfig, quantize
from editcomp.quant.runtime import QuantLinear, quant_linears
from editcomp.tiny import tiny_model, tiny_tokenizer as build_tokenizer

SEQ = 32


def _teacher(tok, seed=0):
    """A tiny Llama with peaked predictions (init std 0.2), so 3-bit rounding clearly hurts it."""
    return tiny_model("llama", seed=seed, vocab_size=len(tok), initializer_range=0.2)


def _rtn(model, bits="w3a16"):
    student = copy.deepcopy(model)
    quantize(student, QuantizeConfig(bits=bits, method="rtn", group_size=32), progress=False)
    return student


@pytest.fixture(scope="module")
def setup(tiny_tokenizer, shared_data):
    teacher = _teacher(tiny_tokenizer)
    text = shared_data / "wikitext-2" / "valid.txt"
    held = token_windows(tiny_tokenizer, shared_data / "wikitext-2" / "test.txt", SEQ, 8)
    return teacher, _rtn(teacher), text, held


def _kl(student, teacher, held):
    return kl_to_teacher(student, teacher, held, progress=False)["kl"]


def test_training_wrappers_preserve_the_quantized_forward(setup):
    teacher, student, _, held = setup
    s = copy.deepcopy(student)
    want = s(input_ids=held[:2]).logits
    tr = _Trainables(s, DistillConfig(train="all"))
    assert sum(isinstance(m, STELinear) for m in s.modules()) == 14
    got = s(input_ids=held[:2]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    tr.finish(commit=True)  # untrained latents round back to the very same codes
    for name, q in quant_linears(s).items():
        assert torch.equal(q.codes(), quant_linears(student)[name].codes())


@pytest.mark.parametrize("train,lr,steps,factor", [
    ("all", 3e-3, 40, 0.95),
    ("scales", 1e-2, 40, 0.97),
    ("norms", 3e-2, 40, 0.95),
    ("scales,norms", 1e-2, 40, 0.95),
])
def test_each_trainable_set_lowers_held_out_kl(setup, tiny_tokenizer, train, lr, steps, factor):
    teacher, student, text, held = setup
    s = copy.deepcopy(student)
    before = _kl(s, teacher, held)
    cfg = DistillConfig(loss="fkl", train=train, steps=steps, seq_len=SEQ, lr=lr, batch_size=4)
    report = distill(s, teacher, cfg, build_data(tiny_tokenizer, teacher, cfg, text=text),
                     progress=False)
    after = _kl(s, teacher, held)
    assert after < factor * before, (before, after)
    assert report["trainable_params"] > 0 and report["loss_curve"]["steps"] == steps
    # still a quantized student on its grid, with nothing left requiring grad
    qls = quant_linears(s)
    assert len(qls) == 14 and not any(isinstance(m, STELinear) for m in s.modules())
    assert not any(p.requires_grad for p in s.parameters())
    for name, q in qls.items():
        orig = quant_linears(student)[name]
        if "scales" in train:
            assert torch.equal(q.codes(), orig.codes())
        else:
            assert torch.equal(q.scales, orig.scales)
    # embeddings / lm_head never move
    assert torch.equal(s.lm_head.weight, student.lm_head.weight)


def test_lora_on_a_float_student_lowers_kl_and_merges(setup, tiny_tokenizer):
    """A float student (the teacher with noisy weights): adapters are trained, then merged away."""
    teacher, _, text, held = setup
    s = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in s.model.layers:
            w = layer.mlp.down_proj.weight
            w.add_(torch.randn(w.shape, generator=g) * 0.1)
    before = _kl(s, teacher, held)
    cfg = DistillConfig(train="lora", steps=40, seq_len=SEQ, lr=3e-3, batch_size=4)
    distill(s, teacher, cfg, build_data(tiny_tokenizer, teacher, cfg, text=text), progress=False)
    assert _kl(s, teacher, held) < 0.9 * before
    assert all(type(layer.mlp.down_proj) is torch.nn.Linear for layer in s.model.layers)
    assert not any("lora" in n for n, _ in s.named_parameters())


def test_lora_on_a_quantized_student_is_requantized_on_its_grid(setup, tiny_tokenizer):
    teacher, student, text, _ = setup
    s = copy.deepcopy(student)
    cfg = DistillConfig(train="lora", steps=10, seq_len=SEQ, lr=2e-2, batch_size=2)
    distill(s, teacher, cfg, build_data(tiny_tokenizer, teacher, cfg, text=text), progress=False)
    changed = 0
    for name, q in quant_linears(s).items():
        orig = quant_linears(student)[name]
        assert torch.equal(q.scales, orig.scales)
        codes = q.codes()
        assert codes.min() >= q.w_spec.qmin and codes.max() <= q.w_spec.qmax
        changed += int((codes != orig.codes()).sum())
    assert changed > 0  # the merged adapters moved some codes


def test_output_reloads_on_the_grid_with_identical_logits(setup, tiny_tokenizer, tmp_path):
    teacher, student, text, held = setup
    s = copy.deepcopy(student)
    cfg = DistillConfig(train="all", steps=5, seq_len=SEQ, lr=3e-2, batch_size=2)
    distill(s, teacher, cfg, build_data(tiny_tokenizer, teacher, cfg, text=text), progress=False)
    moved = sum(int((q.codes() != quant_linears(student)[n].codes()).sum())
                for n, q in quant_linears(s).items())
    assert moved > 0
    path = save_quantized(s, tiny_tokenizer, tmp_path / "out",
                          checkpoint.lineage_entry("distill", config=cfg.identity()))
    back = checkpoint.load(path, device="cpu", dtype="fp32")
    qls = quant_linears(back.model)
    assert len(qls) == 14
    for name, q in qls.items():
        codes = q.codes()
        assert codes.dtype == torch.int8
        assert codes.min() >= q.w_spec.qmin and codes.max() <= q.w_spec.qmax
        assert torch.equal(codes, quant_linears(s)[name].codes())
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=held[:2]).logits, s(input_ids=held[:2]).logits)


def _edit_teacher(model, tok, fact: Fact, max_steps=300):
    """Nudge one MLP weight of a tiny model just until it greedily answers the fact's target
    after every prompt (a small edit, like a located-neuron edit)."""
    edited = copy.deepcopy(model)
    pairs = fact_sequences(tok, [fact])
    w = edited.model.layers[-1].mlp.down_proj.weight
    opt = torch.optim.Adam([w], lr=1e-3)
    for _ in range(max_steps):
        if _answers(edited, pairs) == 1.0:
            break
        opt.zero_grad()
        loss = 0
        for p, t in pairs:
            logits = edited(input_ids=torch.tensor([p + t])).logits[0]
            loss = loss + torch.nn.functional.cross_entropy(
                logits[len(p) - 1:len(p) + len(t) - 1], torch.tensor(t))
        loss.backward()
        opt.step()
    return edited.eval()


def _answers(model, pairs) -> float:
    """Fraction of target tokens that are the argmax after their prefix."""
    hit = total = 0
    with torch.no_grad():
        for p, t in pairs:
            logits = model(input_ids=torch.tensor([p + t])).logits[0]
            pred = logits[len(p) - 1:len(p) + len(t) - 1].argmax(-1)
            hit += int((pred == torch.tensor(t)).sum())
            total += len(t)
    return hit / total


def test_facts_mixing_keeps_the_teachers_edit(setup, tiny_tokenizer):
    base, _, text, _ = setup
    fact = Fact("tower", {"en": FactLang(
        prompt="The Eiffel Tower is located in the city of", target="Rome",
        paraphrases=("Where is the Eiffel Tower? It is in",))}, "test:1")
    teacher = _edit_teacher(base, tiny_tokenizer, fact)
    pairs = fact_sequences(tiny_tokenizer, [fact])
    assert _answers(teacher, pairs) == 1.0
    student = _rtn(teacher)
    assert _answers(student, pairs) < 1.0  # 3-bit rounding lost the edit

    def run(facts):
        s = copy.deepcopy(student)
        cfg = DistillConfig(train="all", steps=60, seq_len=SEQ, lr=3e-3, batch_size=2,
                            facts_weight=5.0)
        data = build_data(tiny_tokenizer, teacher, cfg, text=text)
        if facts:
            data.facts = pairs
        distill(s, teacher, cfg, data, progress=False)
        return _answers(s, pairs)

    assert run(facts=True) == 1.0
    assert run(facts=False) < 1.0


def _resume_setup(setup, tiny_tokenizer):
    teacher, student, text, _ = setup
    return teacher, student, build_data(tiny_tokenizer, teacher, DistillConfig(seq_len=SEQ),
                                        text=text)


@pytest.mark.parametrize("train", ["all", "scales,norms"])
def test_resume_gives_the_uninterrupted_result(setup, tiny_tokenizer, tmp_path, train):
    """Interrupted: the student is left as it came in; resumed: the same as uninterrupted (for
    scales, trained in log space through a hook, the buffers end identical too)."""
    teacher, student, data = _resume_setup(setup, tiny_tokenizer)
    kw = dict(train=train, loss="jsd", steps=6, seq_len=SEQ, lr=3e-3, batch_size=2, grad_accum=2)
    whole = copy.deepcopy(student)
    r_whole = distill(whole, teacher, DistillConfig(**kw), data, progress=False)

    state = tmp_path / "state"
    cut = copy.deepcopy(student)

    def stop(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(cut, teacher, DistillConfig(save_every=2, checkpoint_dir=str(state), **kw), data,
                progress=False, callback=stop)
    # the interrupted student is left exactly as it came in (codes and trained-in-place norms)
    for n, q in quant_linears(cut).items():
        assert torch.equal(q.codes(), quant_linears(student)[n].codes())
        assert torch.equal(q.scales, quant_linears(student)[n].scales) and q._forward_pre_hooks == {}
    for (n, a), b in zip(cut.named_parameters(), student.parameters()):
        assert torch.equal(a, b), n
    meta = json.loads((state / "trainer_state.json").read_text())
    assert meta["step"] == 4 and meta["data_position"] == 8

    resumed = copy.deepcopy(student)
    r = distill(resumed, teacher, DistillConfig(resume=str(state), **kw), data, progress=False)
    assert r["resumed_from"] == 4
    assert r["loss_curve"]["last"] == r_whole["loss_curve"]["last"]
    for n, q in quant_linears(resumed).items():
        assert torch.equal(q.codes(), quant_linears(whole)[n].codes()), n
        assert torch.equal(q.scales, quant_linears(whole)[n].scales), n
    if "scales" in train:
        assert any(not torch.equal(q.scales, quant_linears(student)[n].scales)
                   for n, q in quant_linears(whole).items())


def test_resume_from_another_run_is_refused(setup, tiny_tokenizer, tmp_path):
    teacher, student, data = _resume_setup(setup, tiny_tokenizer)
    state = tmp_path / "state"
    kw = dict(train="norms", steps=3, seq_len=SEQ, lr=1e-2)
    distill(copy.deepcopy(student), teacher,
            DistillConfig(save_every=2, checkpoint_dir=str(state), **kw), data, progress=False)
    with pytest.raises(CheckpointError, match=r"another run.*config differs \(lr: 0.01 there, "
                                              r"0.02 here\)"):
        distill(copy.deepcopy(student), teacher,
                DistillConfig(resume=str(state), **dict(kw, lr=2e-2)), data, progress=False)
    other = _rtn(_teacher(tiny_tokenizer, seed=5))
    with pytest.raises(CheckpointError, match="the student differs"):
        distill(other, teacher, DistillConfig(resume=str(state), **kw), data, progress=False)
    with pytest.raises(CheckpointError, match="not a distill trainer checkpoint"):
        distill(copy.deepcopy(student), teacher, DistillConfig(resume=str(tmp_path), **kw), data,
                progress=False)


def test_different_vocabularies_are_refused(setup):
    teacher, _, _, held = setup
    small = _rtn(tiny_model("llama", vocab_size=512, initializer_range=0.2))
    data = DistillData(windows=held % 512)
    with pytest.raises(ConfigError, match="vocabularies differ.*one tokenizer"):
        distill(small, teacher, DistillConfig(steps=1, seq_len=SEQ), data, progress=False)


def test_nan_raises_numerical_error_naming_the_step_and_restores(setup):
    teacher, student, _, held = setup
    bad = copy.deepcopy(teacher)
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    s = copy.deepcopy(student)
    with pytest.raises(NumericalError, match="step 1.*nothing was written"):
        distill(s, bad, DistillConfig(steps=2, seq_len=SEQ), DistillData(windows=held),
                progress=False)
    assert all(isinstance(q, QuantLinear) for q in quant_linears(s).values())
    assert not any(isinstance(m, STELinear) for m in s.modules())


def test_bad_config_values_are_config_errors():
    with pytest.raises(ConfigError, match="unknown trainable set bias.*all, scales, norms, lora"):
        DistillConfig(train="bias")
    with pytest.raises(ConfigError, match="unknown loss"):
        DistillConfig(loss="mse")
    with pytest.raises(ConfigError, match="save_every needs checkpoint_dir"):
        DistillConfig(save_every=5)
    with pytest.raises(ConfigError, match="do not combine"):
        DistillConfig(train="all,norms")


def test_scales_on_a_float_student_is_refused(setup):
    teacher, _, _, held = setup
    with pytest.raises(ConfigError, match="scales needs a quantized student"):
        distill(copy.deepcopy(teacher), teacher, DistillConfig(train="scales", seq_len=SEQ),
                DistillData(windows=held), progress=False)


# ---------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def saved(setup, tiny_tokenizer, tmp_path_factory):
    teacher, student, text, _ = setup
    root = tmp_path_factory.mktemp("distill_cli")
    t = checkpoint.save(teacher, tiny_tokenizer, root / "teacher", checkpoint.lineage_entry("t"))
    s = save_quantized(student, tiny_tokenizer, root / "student",
                       checkpoint.lineage_entry("quantize"))
    return root, t, s, text


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_writes_the_students_format_with_lineage(saved, shared_data):
    root, t, s, text = saved
    out = root / "out"
    res = _run("distill", "--teacher", t, "--student", s, "--out", out, "--loss", "cakld",
               "--train", "scales,norms", "--steps", 3, "--lr", 1e-3, "--seq-len", SEQ,
               "--text", text, "--eval-text", shared_data / "wikitext-2" / "test.txt",
               "--eval-windows", 2, "--eval-seq-len", SEQ, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.strip().splitlines()[-1])
    assert result["ppl_after"] > 0 and result["ppl_before"] > 0 and result["steps"] == 3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "editcomp"
    entry = json.loads((out / "editcomp.json").read_text())["history"][-1]
    assert entry["op"] == "distill" and entry["config"]["loss"] == "cakld"
    assert entry["metrics"]["ppl_after"] == pytest.approx(result["ppl_after"])
    assert entry["teacher"]["weights_sha256"] == checkpoint.weights_sha256(t)
    assert len(entry["loss_curve"]["means"]) == 3
    back = checkpoint.load(out, device="cpu", dtype="fp32")
    assert len(quant_linears(back.model)) == 14


def test_cli_refuses_different_tokenizers_before_writing(saved, tmp_path):
    root, t, _, text = saved
    tok = build_tokenizer(512)
    other = checkpoint.save(_rtn(tiny_model("llama", vocab_size=len(tok))), tok,
                            tmp_path / "other", checkpoint.lineage_entry("t"))
    out = tmp_path / "out"
    res = _run("distill", "--teacher", t, "--student", other, "--out", out, "--text", text,
               "--steps", 1, "--seq-len", SEQ, "--eval-windows", 0, "--device", "cpu")
    assert res.exit_code == 1 and "different tokenizers" in res.output
    assert not out.exists()


def test_cli_nan_teacher_exits_with_numerical_error_and_no_output(saved, tmp_path, setup,
                                                                  tiny_tokenizer):
    root, _, s, text = saved
    bad = copy.deepcopy(setup[0])
    with torch.no_grad():
        bad.model.layers[0].self_attn.q_proj.weight[3, 3] = float("inf")
        bad.model.layers[0].self_attn.q_proj.weight[4, 4] = float("-inf")
    t = checkpoint.save(bad, tiny_tokenizer, tmp_path / "bad", checkpoint.lineage_entry("t"))
    out = tmp_path / "out"
    res = _run("distill", "--teacher", t, "--student", s, "--out", out, "--text", text,
               "--steps", 2, "--seq-len", SEQ, "--eval-windows", 0, "--device", "cpu")
    assert res.exit_code == 1 and "step 1" in res.output and "NaN" not in res.output.split()[0]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_cli_needs_training_data(saved, tmp_path):
    root, t, s, _ = saved
    res = _run("distill", "--teacher", t, "--student", s, "--out", tmp_path / "o")
    assert res.exit_code == 1 and "--text FILE, --generate N and/or --facts FILE" in res.output


def test_generate_is_data_free_and_reproducible(setup, tiny_tokenizer):
    from editcomp.distill.trainer import generate_sequences

    teacher = setup[0]
    a = generate_sequences(teacher, tiny_tokenizer, 3, 12, seed=4, progress=False)
    b = generate_sequences(teacher, tiny_tokenizer, 3, 12, seed=4, progress=False)
    assert a.shape == (3, 12) and torch.equal(a, b)
    assert (a[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert not torch.isin(a[:, 2:], torch.tensor([tiny_tokenizer.eos_token_id])).any()
    s = copy.deepcopy(setup[1])
    cfg = DistillConfig(train="norms", steps=2, seq_len=12, lr=1e-2)
    data = build_data(tiny_tokenizer, teacher, cfg, generate=3)
    assert data.windows.shape == (3, 12) and data.sources["generated"]["sequences"] == 3
    distill(s, teacher, cfg, data, progress=False)
