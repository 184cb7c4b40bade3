"""eval.py's analysis modes on an LM-head checkpoint (``training=lm``): one tiny ``+experiment=shapes_lm`` run
(two training batches) shared by the module, each mode run as a user runs it (``eval.py mode=...``) or through
its function on the checkpoint loaded the way eval.py loads it, against eval.py's own numbers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from analysis_helpers import strict_json
from entrypoints import ROOT, TrainedAndEvaluated, run, train_then_eval

from fusion.analysis.common import AnalysisContext, keep_only, open_analysis
from fusion.analysis.encoder_ablation import NONE
from fusion.fusers.groups import PAD_GROUP

ENCODERS = ["clip_tiny", "dino_tiny"]
# The tiny LM-head run of tests/test_training_lm_module.py (2 layers x 4 heads, 32 wide): 12 test questions.
LM = [
    "+experiment=shapes_lm", f"encoder=[{','.join(ENCODERS)}]", "logger=csv", "data.num_workers=0",
    "data.batch_size=4", "fusion.width=32", "task.num_train=4", "task.num_val=4", "task.num_test=4",
    "training.head.lm_name_or_path.hidden_size=32",
]
TRAIN = ["+trainer.num_sanity_val_steps=0", "+trainer.limit_train_batches=2"]
SPLIT = "test"
N_TEST = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TrainedAndEvaluated:
    """One epoch of ``train.py`` (two batches), then ``eval.py`` of its checkpoint on the test split."""
    return train_then_eval(LM, SPLIT, tmp_path_factory.mktemp("analysis_lm"), train_args=TRAIN)


def ckpt_of(trained: TrainedAndEvaluated) -> Path:
    return trained.run / "checkpoints" / "last.ckpt"


def run_mode(trained: TrainedAndEvaluated, mode: str, *extra: str) -> tuple[dict, Path]:
    """``python eval.py mode=<mode> ckpt_path=<the LM checkpoint> split=test ...``; its results.json (strict) and
    report folder."""
    workdir = trained.run.parent
    out = workdir / f"eval_{mode}"
    proc = run("eval.py", [f"mode={mode}", f"ckpt_path={ckpt_of(trained)}", *LM, f"split={SPLIT}", *extra,
                           f"hydra.run.dir={out}"], workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return strict_json((out / mode / "results.json").read_text()), out / mode


@contextlib.contextmanager
def analysis(trained: TrainedAndEvaluated, mode: str, *extra: str) -> Iterator[AnalysisContext]:
    """The checkpoint opened as ``eval.py mode=<mode>`` opens it (in this process; eval.py's config)."""
    from hydra import compose, initialize_config_dir

    workdir = trained.run.parent
    out = workdir / f"inproc_{mode}"
    overrides = [*LM, f"mode={mode}", f"ckpt_path={ckpt_of(trained)}", f"split={SPLIT}", *extra,
                 f"paths.data_dir={workdir / 'data'}", f"paths.cache_dir={workdir / 'cache'}",
                 f"paths.output_dir={out}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    threads = torch.get_num_threads()
    try:
        with open_analysis(cfg, mode) as ctx:
            yield ctx
    finally:
        torch.set_num_threads(threads)  # open_analysis sets analysis.num_threads for the process


# ---- encoder_ablation ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ablation(trained):
    return run_mode(trained, "encoder_ablation")


def test_encoder_ablation_all_encoders_is_eval_py(trained, ablation):
    results, folder = ablation
    metrics = trained.eval_metrics
    full = results["subsets"]["+".join(ENCODERS)]
    # The module's own evaluation step (generated answers, teacher-forced loss): eval.py's numbers.
    assert full["n"] == N_TEST
    assert {k: full[k] for k in ("acc", "acc_color", "acc_shape")} == pytest.approx(
        {k: metrics[f"{SPLIT}/{k}"] for k in ("acc", "acc_color", "acc_shape")})
    # eval.py's loss comes from the eager attention pass (attention statistics), the analysis's from SDPA.
    assert full["loss"] == pytest.approx(metrics[f"{SPLIT}/loss"], rel=1e-5)
    assert set(results["subsets"]) == {*ENCODERS, "+".join(ENCODERS), NONE}
    losses = {name: v["loss"] for name, v in results["subsets"].items()}
    assert len(set(losses.values())) == 4, losses  # every subset is another input to the LM
    marginal = results["marginal"]
    acc = {k: v["acc"] for k, v in results["subsets"].items()}
    assert sum(m["shapley"] for m in marginal.values()) == pytest.approx(acc["+".join(ENCODERS)] - acc[NONE])
    for e in ENCODERS:
        assert results["masking"][e]["n"] == N_TEST and results["masking"][e]["n_scored"] == N_TEST
    assert (folder / "subsets.png").is_file() and (folder / "masking.csv").is_file()


def test_a_dropped_encoder_leaves_the_lm_input_through_its_tokens_only(trained, ablation):
    results, _ = ablation
    with analysis(trained, "encoder_ablation") as ctx:
        model = ctx.model
        batch = next(iter(ctx.batches()))
        full, _ = model(batch)
        with keep_only(model, ["clip_tiny"]):
            dropped, fused = model(batch)
        assert not fused.visible[:, fused.token_encoder == 1].any()
        for b in range(len(batch["questions"])):
            groups, real = full.inputs.groups[b], full.inputs.groups[b] != PAD_GROUP
            kept = real & (groups != 1)  # every real position but dino_tiny's visual tokens
            d_groups = dropped.inputs.groups[b]
            d_real = d_groups != PAD_GROUP
            assert torch.equal(groups[kept], d_groups[d_real]) and not (d_groups == 1).any()
            # The same embeddings at the same places: BOS, clip_tiny's tokens, prompt and answer.
            torch.testing.assert_close(full.inputs.inputs_embeds[b][kept], dropped.inputs.inputs_embeds[b][d_real])
            assert int(real.sum()) - int(d_real.sum()) == int((fused.token_encoder == 1).sum())
        # The mode's clip_tiny row is that input's loss, over the whole split.
        loss, weight = 0.0, 0
        with keep_only(model, ["clip_tiny"]):
            for batch in ctx.batches():
                out, _ = model(batch)
                loss += float(out.loss) * len(batch["questions"])
                weight += len(batch["questions"])
    assert results["subsets"]["clip_tiny"]["loss"] == pytest.approx(loss / weight, rel=1e-5)


# ---- attention -------------------------------------------------------------------------------------------


def in_process(trained: TrainedAndEvaluated, mode: str, *extra: str) -> tuple[dict, Path]:
    """The mode's function on the checkpoint opened as eval.py opens it; its results.json (strict) and folder."""
    from importlib import import_module

    with analysis(trained, mode, *extra) as ctx:
        getattr(import_module(f"fusion.analysis.{mode}"), mode)(ctx)
        folder = ctx.out_dir
    return strict_json((folder / "results.json").read_text()), folder


def test_attention_is_the_lms_statistic_eval_py_writes(trained):
    results, folder = in_process(trained, "attention")
    groups = [*ENCODERS, "prompt", "answer", "bos"]
    assert results["groups"] == groups and results["queries"] == ["prompt", "answer"]
    assert (results["num_layers"], results["num_heads"]) == (2, 4)
    assert results["tokens_per_image"] == {"clip_tiny": 17, "dino_tiny": 37}
    # eval.py's attention statistics (the test epoch's LMAttentionOverEncoders) over the same split.
    from fusion.monitoring.attention_stats import LM_QUERY_KINDS, load_stats

    stats, saved_groups = load_stats(trained.out / "attention" / SPLIT, query_kinds=LM_QUERY_KINDS)
    assert saved_groups == groups
    mine = torch.tensor([results["prompt"], results["answer"]])
    torch.testing.assert_close(mine, stats, atol=1e-5, rtol=0)
    torch.testing.assert_close(mine.sum(-1), torch.ones(2, 2, 4), atol=1e-5, rtol=0)
    # The prompt queries never see the answer (causal attention).
    assert float(mine[0, ..., groups.index("answer")].abs().max()) == 0.0
    assert results["metrics"]["loss"] == pytest.approx(trained.eval_metrics[f"{SPLIT}/loss"], rel=1e-5)
    # Split by answer type: every example once; the overall mass is the example-weighted mean.
    assert sum(p["n"] for p in results["by"].values()) == N_TEST
    weighted = sum(torch.tensor(p["prompt"]) * p["n"] for p in results["by"].values()) / N_TEST
    torch.testing.assert_close(weighted, mine[0], atol=1e-5, rtol=0)
    heads = results["heads"]
    assert len(heads) == 8 and [h["rank"] for h in heads] == list(range(1, 9))
    image = [h["prompt_to_image"] for h in heads]
    assert image == sorted(image, reverse=True)
    for h in heads:
        for q in ("prompt", "answer"):
            total = h[f"{q}_to_image"] + h[f"{q}_to_prompt"] + h[f"{q}_to_answer"] + h[f"{q}_to_bos"]
            assert total == pytest.approx(1, abs=1e-5)
    report = (folder / "report.md").read_text()
    for name in ("prompt_layers", "answer_heads", "heads_ranked", "prompt_by_answer_type"):
        assert (folder / f"{name}.png").is_file() and f"]({name}.png)" in report
    assert (folder / "heads.csv").read_text().count("\n") == 1 + 8


# ---- cross_modal_ablation --------------------------------------------------------------------------------


def test_cross_modal_text_ablation_replaces_the_question_in_the_prompt(trained):
    from fusion.analysis.cross_modal_ablation import conditions

    with analysis(trained, "cross_modal_ablation") as ctx:
        model = ctx.model
        batch = next(iter(ctx.batches()))
        ablate = conditions(ctx)["text"]
        ablated = ablate(batch)
        tokenizer, template = model.head.tokenizer, model.head.prompt_template
        counts = model.question_token_counts(batch["questions"])
        assert all(n > 0 for n in counts)
        # Each question is the padding token once per LM token it takes in its prompt; the template stays.
        assert ablated["questions"] == ["<pad>" * n for n in counts]
        assert model.prompts(ablated) == [template.format(question="<pad>" * n) for n in counts]
        ids = tokenizer(model.prompts(ablated), add_special_tokens=False)["input_ids"]
        for row, n in zip(ids, counts, strict=True):
            assert row.count(tokenizer.pad_token_id) == n
            kept = [i for i in row if i != tokenizer.pad_token_id]
            assert tokenizer.decode(kept) == template.replace("{question}", "")
        # The fuser (token_concat) does not read the text: its word pieces are left alone, the images too.
        assert torch.equal(ablated["input_ids"], batch["input_ids"]) and ablated["images"] is batch["images"]
        # The LM sees the image tokens it saw before and another prompt.
        out, _ = model(batch)
        out_ablated, _ = model(ablated)
        assert not torch.equal(out.loss, out_ablated.loss)
    results, folder = in_process(trained, "cross_modal_ablation")
    assert results["text_ablation"] == {"filler": "<pad>", "fuser_text_masked": False}
    clean = results["conditions"]["none"]
    metrics = trained.eval_metrics
    assert clean["n"] == N_TEST and clean["acc"] == pytest.approx(metrics[f"{SPLIT}/acc"])
    assert clean["loss"] == pytest.approx(metrics[f"{SPLIT}/loss"], rel=1e-5)
    names = ["none", *(f"vision:{e}" for e in ENCODERS), "vision:all", "text", "vision:all+text"]
    assert set(results["conditions"]) == set(names)
    for name in names[1:]:  # every ablation is another input: another loss
        change = results["changes"][name]
        assert change["loss_change"] == pytest.approx(results["conditions"][name]["loss"] - clean["loss"])
        assert change["loss_change"] != 0.0, name
    assert "`<pad>` once per LM token" in (folder / "report.md").read_text()


# ---- probe -----------------------------------------------------------------------------------------------


def test_probe_reads_the_lms_hidden_states_at_the_last_prompt_token(trained):
    from fusion.analysis.probe import LMCollector

    with analysis(trained, "probe") as ctx:
        model = ctx.model
        batch = next(iter(ctx.batches()))
        collector = LMCollector(ctx)
        assert collector.depths == ["input", "layer 0", "final"]
        collector.step(batch, output_attentions=False)
        states = collector.close()
        # The input state of the last prompt token is its embedding: the template's last token, the same for all.
        first = states["input/last_prompt"]
        assert torch.equal(first, first[:1].expand_as(first))
        # The final state is what the LM's output layer reads: its argmax is the first token generation gives.
        logits = model.head.base_lm.get_output_embeddings()(states["final/last_prompt"])
        fused = model.fused_tokens(batch)
        inputs = model.head.build_inputs(fused, model.prompts(batch))
        out = model.head.run_lm(inputs, logits_to_keep=1)
        torch.testing.assert_close(logits, out.logits[:, -1].float(), atol=1e-5, rtol=1e-5)
    results, folder = in_process(trained, "probe", "analysis.probe.max_fit=12")
    assert results["depths"] == ["input", "layer 0", "final"]
    assert results["fit_examples"] == 12 and results["test_examples"] == N_TEST
    assert set(results["probes"]) == {"answer_type", "answer", "encoders", "num_shapes", "top_left_color"}
    for by_rep in results["probes"].values():
        assert set(by_rep) == {"last_prompt", "mean"}
        assert all(set(by_depth) == set(results["depths"]) for by_depth in by_rep.values())
    # Which encoders a sample saw decides how many visual tokens the mean covers; the last prompt token's
    # embedding cannot know it.
    encoders = results["probes"]["encoders"]
    assert encoders["mean"]["input"]["accuracy"] > encoders["mean"]["input"]["majority"] + 0.3
    heads = results["modality_importance"]
    assert len(heads) == 8 and not any(k.startswith("answer_to_") for h in heads for k in h)
    for h in heads:
        assert h["prompt_to_image"] + h["prompt_to_prompt"] + h["prompt_to_bos"] == pytest.approx(1, abs=1e-5)
    assert (folder / "probes.csv").read_text().count("\n") == 1 + 5 * 2 * 3
    assert results["figures"]["modality_importance"]["columns"] == ["prompt -> image", "prompt -> prompt",
                                                                   "prompt -> BOS"]


# ---- causal_trace ----------------------------------------------------------------------------------------


def _check_exact(results: dict) -> None:
    """Restoring every position of a layer gives the clean scores bitwise, none the corrupted ones, every head
    the attention output."""
    assert results["restore_all_exact"] and results["restore_none_exact"] and results["restore_heads_exact"]
    assert results["restore_all_score"] == [results["clean_score"]] * 2
    assert results["restore_none_score"] == [results["corrupted_score"]] * 2


def _check_positions(results: dict) -> None:
    labels = results["positions"]
    assert labels[0] == "[BOS]" and labels[1] == "clip_tiny[0]"
    assert sum(label.startswith("clip_tiny[") for label in labels) == 17
    assert sum(label.startswith("dino_tiny[") for label in labels) == 37
    assert labels[1 + 17 + 37] == "prompt 0" and "answer 0" in labels
    recovery = results["position_recovery"]  # (layers, positions)
    assert len(recovery) == 2 and len(recovery[1]) == len(labels)
    # After the last layer a position's state reaches its own logits only: BOS and the image tokens, whose
    # logits no answer token reads, restore nothing (exactly).
    for j, label in enumerate(labels):
        if label == "[BOS]" or "[" in label:
            assert recovery[1][j] in (0.0, None), label
    assert len(results["head_recovery"]) == 2 and len(results["head_recovery"][0]) == 4


def test_causal_trace_patches_the_lm_layers_encoder_swap(trained):
    results, folder = in_process(trained, "causal_trace", "analysis.causal_trace.corrupt=encoder:dino_tiny",
                                 "analysis.causal_trace.max_pairs=4", "analysis.causal_trace.min_effect=-1")
    assert results["num_pairs"] == 4 and results["candidate_pairs"] >= 4
    _check_exact(results)
    _check_positions(results)
    assert results["position_pairs"][0] == 4  # [BOS]: every pair
    for png in ("positions.png", "heads.png"):
        assert (folder / png).is_file()


def test_causal_trace_text_pairs_keep_the_lms_layout(trained, tmp_path):
    from fusion.analysis.shapes_scene import word_swaps

    swaps = [["red", "green", "blue", "yellow", "purple"], ["circle", "square", "triangle"], ["top", "bottom"],
             ["left", "right"]]
    with analysis(trained, "causal_trace") as ctx:
        model, bert = ctx.model, ctx.model.text.tokenizer
        rows = []
        for example in ctx.task.examples(SPLIT):
            q = example.question
            # A swap that keeps the word pieces and the LM tokens of the question: the same layouts.
            pieces = bert(q)["input_ids"]
            same = [c for c in word_swaps(q, swaps)
                    if len(bert(c)["input_ids"]) == len(pieces) and bert(c)["input_ids"] != pieces
                    and model.question_token_counts([c]) == model.question_token_counts([q])]
            if same:
                rows.append({"question_id": example.question_id, "corrupted_question": same[0]})
    assert len(rows) >= 3
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps(rows))
    results, _ = in_process(trained, "causal_trace", f"analysis.causal_trace.pairs={pairs}",
                            "analysis.causal_trace.min_effect=-1")
    assert results["num_pairs"] == len(rows) and results["corrupt"] == "text"
    assert {p["corrupted_question"] for p in results["pairs"]} == {r["corrupted_question"] for r in rows}
    _check_exact(results)
    _check_positions(results)
