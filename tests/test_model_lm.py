"""The LM head on tiny random Llama, Qwen2 and GPT-2 models saved to folders (lm_helpers): layout, removal of
dropped encoders, padding invariance, loss, rank classification, generation, regimes, LoRA, fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lm_helpers import ARCHS, build_tiny_lm, fused_tokens

from fusion.fusers import FusedTokens, TokenConcatFuser
from fusion.fusers.groups import ANSWER_GROUP, CLS_GROUP, MIXED_GROUP, PAD_GROUP, TEXT_GROUP
from fusion.model.lm import LMHead, check_lm_fingerprint, format_prompt
from fusion.model.lm_parts import greedy_decode

WIDTH = 16
PROMPTS = ["Question: what color is the shape? Answer:", "Question: is there a square? Answer:"]


@pytest.fixture(scope="module")
def lms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lms")
    return {arch: build_tiny_lm(root / arch, arch) for arch in ARCHS}


def _head(folder: Path, **kwargs) -> LMHead:
    torch.manual_seed(0)  # the projector's init
    return LMHead(folder, width=WIDTH, **kwargs)


def _real_logits(out, row: int) -> torch.Tensor:
    """(S_row, V): the logits of ``row``'s real positions (left padding: the last ones)."""
    return out.logits[row, -int(out.inputs.attention_mask[row].sum()):]


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_layout_loss_and_attention_readout(lms, arch):
    head = _head(lms[arch]).eval()
    fused = fused_tokens(2, mixed=1)
    out = head(fused, PROMPTS, ["red", "yes"])
    assert torch.isfinite(out.loss) and out.loss > 0
    inputs = out.inputs
    bos = [CLS_GROUP] if arch == "llama" else []  # only Llama's tokenizer adds BOS
    n_prompt = len(head.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"])
    n_answer = len(head.answer_ids(["yes"])[0])
    row = inputs.groups[1][inputs.attention_mask[1].bool()].tolist()
    assert row == bos + [0, 0, 0, 1, 1, MIXED_GROUP] + [TEXT_GROUP] * n_prompt + [ANSWER_GROUP] * n_answer
    assert (inputs.groups[inputs.attention_mask == 0] == PAD_GROUP).all()
    assert inputs.labels[1, -n_answer:].tolist() == head.answer_ids(["yes"])[0]
    assert (inputs.labels[1, :-n_answer] == -100).all()
    assert out.logits.shape[1] == max(len(a) for a in head.answer_ids(["red", "yes"])) + 1  # the answer tail only

    # The loss from the answer tail equals the cross-entropy over the full logits.
    full = head(fused, PROMPTS, ["red", "yes"], all_logits=True)
    shifted = torch.nn.functional.cross_entropy(full.logits[:, :-1].flatten(0, 1), inputs.labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, shifted)

    with torch.no_grad():
        read = head(fused, PROMPTS, output_attentions=True, output_hidden_states=True)
    assert head.base_lm.config._attn_implementation == "sdpa"  # eager for that call only
    S = read.inputs.attention_mask.shape[1]
    assert len(read.attentions) == 2 and read.attentions[0].shape == (2, 4, S, S)
    assert len(read.hidden_states) == 3
    real = read.inputs.attention_mask.bool()
    for probs in read.attentions:
        sums = probs.sum(-1)  # (B, H, S): 1 for every real query
        queries = real[:, None, :].expand_as(sums)
        torch.testing.assert_close(sums[queries], torch.ones_like(sums[queries]))
        to_padding = (~real)[:, None, None, :] & real[:, None, :, None]
        assert float(probs.masked_select(to_padding.expand_as(probs)).abs().sum()) == 0
    torch.testing.assert_close(_real_logits(read, 0), _real_logits(head(fused, PROMPTS, all_logits=True), 0))


@pytest.mark.parametrize("arch", ARCHS)
def test_dropped_encoder_is_removed_and_padding_does_not_matter(lms, arch):
    head = _head(lms[arch]).eval()
    fused = fused_tokens(2, per_encoder=(3, 2))
    fused.visible[0, 3:] = False  # sample 0 drops encoder 1
    with torch.no_grad():
        batch = head(fused, ["a short one? Answer:", PROMPTS[0]], ["red", "top left"], all_logits=True)
        # The same sample built without encoder 1's tokens at all, alone (no padding).
        alone = FusedTokens(fused.tokens[:1, :3], fused.token_encoder[:3], torch.ones(1, 3, dtype=torch.bool))
        single = head(alone, ["a short one? Answer:"], ["red"], all_logits=True)
        zeroed = FusedTokens(fused.tokens.clone(), fused.token_encoder, torch.ones_like(fused.visible))
        zeroed.tokens[0, 3:] = 0
        zero = head(zeroed, ["a short one? Answer:", PROMPTS[0]], ["red", "top left"], all_logits=True)
    assert 1 not in batch.inputs.groups[0].tolist()
    assert int(batch.inputs.attention_mask[0].sum()) < batch.inputs.attention_mask.shape[1]  # sample 0 is padded
    torch.testing.assert_close(_real_logits(batch, 0), single.logits[0], atol=1e-5, rtol=1e-5)
    n = single.logits.shape[1]
    torch.testing.assert_close(batch.inputs.position_ids[0, -n:], torch.arange(n))
    assert not torch.allclose(_real_logits(zero, 0)[-3:], single.logits[0, -3:], atol=1e-3)  # zeroing is not removal
    # Same loss alone as inside the padded batch (per-sample: one answer each).
    with torch.no_grad():
        per_sample = head.rank_candidates(fused, ["a short one? Answer:", PROMPTS[0]], ["red"])
        alone_score = head.rank_candidates(alone, ["a short one? Answer:"], ["red"])
    torch.testing.assert_close(per_sample[0], alone_score[0], atol=1e-5, rtol=1e-5)


def test_a_real_fusers_dropped_encoder_changes_the_output_only_through_its_tokens(lms):
    """TokenConcatFuser with a keep mask (the VE-dropout path): the LM sees the kept encoders' tokens only."""
    fuser = TokenConcatFuser({"a": 8, "b": 12}, {"a": 5, "b": 5}, width=WIDTH).eval()
    head = _head(lms["qwen2"]).eval()
    gen = torch.Generator().manual_seed(4)
    features = {"a": torch.randn(2, 5, 8, generator=gen), "b": torch.randn(2, 5, 12, generator=gen)}
    keep = torch.tensor([[True, False], [True, True]])
    with torch.no_grad():
        dropped = head(fuser(features, keep), PROMPTS, all_logits=True)
        full = head(fuser(features, torch.ones_like(keep)), PROMPTS, all_logits=True)
        # Encoder b's tokens changed: sample 0 (b dropped) does not move, sample 1 does.
        features["b"] = features["b"] + 1
        moved = head(fuser(features, keep), PROMPTS, all_logits=True)
    assert (dropped.inputs.groups[0] == 1).sum() == 0 and (dropped.inputs.groups[1] == 1).sum() == 5
    torch.testing.assert_close(_real_logits(moved, 0), _real_logits(dropped, 0))
    assert not torch.allclose(_real_logits(moved, 1), _real_logits(dropped, 1))
    torch.testing.assert_close(_real_logits(full, 1), _real_logits(dropped, 1), atol=1e-5, rtol=1e-5)


def test_a_bfloat16_lm_takes_float32_visual_tokens(lms):
    head = _head(lms["gpt2"], lm_kwargs={"dtype": torch.bfloat16})
    assert head.base_lm.dtype == torch.bfloat16 and head.projector[0].weight.dtype == torch.float32
    out = head(fused_tokens(2), PROMPTS, ["red", "yes"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.projector.parameters())
    assert head.lm_fingerprint()["config"]["dtype"] == "bfloat16"


def test_training_makes_rank_and_generate_give_the_answer(lms):
    head = _head(lms["llama"], regime="full").train()
    fused = fused_tokens(1, seed=1)
    prompt, candidates = ["Question: what color is the circle? Answer:"], ["red", "blue", "top left"]
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(12):
        loss = head(fused, prompt, ["blue"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    scores = head.rank_candidates(fused, prompt, candidates)
    assert scores.shape == (1, 3) and scores.argmax().item() == 1, scores
    probs = scores.softmax(-1)
    assert probs[0, 1] > 0.9
    # Greedy decoding says it and stops at EOS, alone and beside a longer sample (left padding).
    other = fused_tokens(1, seed=2)
    both = FusedTokens(torch.cat([fused.tokens, other.tokens]), fused.token_encoder, torch.ones(2, 5, dtype=bool))
    assert head.generate(fused, prompt, max_new_tokens=8) == ["blue"]
    answers = head.generate(both, prompt + ["Question: and this much longer question here? Answer:"], 8)
    assert answers[0] == "blue" and isinstance(answers[1], str)
    inputs = head.build_inputs(fused, prompt)
    ids, finished = greedy_decode(
        head.lm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, head.eos_token_id, 8
    )
    assert bool(finished.all()) and ids.shape[1] == len(head.answer_ids(["blue"])[0]) < 8
    assert ids[0, -1].item() == head.eos_token_id


def _step(head: LMHead) -> None:
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.5)
    head(fused_tokens(2), PROMPTS, ["red", "yes"]).loss.backward()
    opt.step()


def test_projector_regime_trains_only_the_projector(lms):
    head = _head(lms["qwen2"], regime="projector", gradient_checkpointing=True).train()
    lm_before = {k: v.clone() for k, v in head.lm.state_dict().items()}
    proj_before = {k: v.clone() for k, v in head.projector.state_dict().items()}
    _step(head)
    assert all(torch.equal(v, head.lm.state_dict()[k]) for k, v in lm_before.items())
    assert not all(torch.equal(v, head.projector.state_dict()[k]) for k, v in proj_before.items())
    assert set(head.trainable_state_dict()) == {f"projector.{k}" for k in proj_before}
    full = _head(lms["qwen2"], regime="full")
    assert set(full.trainable_state_dict()) == set(full.state_dict())


def test_gradient_checkpointing_gives_the_same_gradients(lms):
    grads = []
    for checkpointing in (False, True):
        head = _head(lms["gpt2"], gradient_checkpointing=checkpointing).train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in head.base_lm.modules()) == checkpointing
        head(fused_tokens(2), PROMPTS, ["red", "yes"]).loss.backward()
        grads.append([p.grad for p in head.projector.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # Linear and Conv1D projections (Qwen2's are Llama's)
def test_lora_trains_adapters_only_and_reloads_identically(lms, arch, tmp_path):
    head = _head(lms[arch], regime="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0).train()
    trainable = [n for n, p in head.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("projector.") or "lora_" in n for n in trainable)
    assert any("lora_" in n for n in trainable)
    base_before = {k: v.clone() for k, v in head.base_lm.state_dict().items() if "lora_" not in k}
    _step(head)
    assert all(torch.equal(v, head.base_lm.state_dict()[k]) for k, v in base_before.items())
    head.eval()
    fused = fused_tokens(2, seed=3)
    with torch.no_grad():
        expected = head(fused, PROMPTS, all_logits=True).logits
        with head.lm.disable_adapter():
            assert not torch.allclose(head(fused, PROMPTS, all_logits=True).logits, expected)  # the step did something
    head.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    state = head.trainable_state_dict()
    torch.save(state, tmp_path / "trainable.pt")

    # Through peft's own format: adapters from the folder, the projector from the state dict.
    again = _head(lms[arch], regime="lora", adapter_path=tmp_path / "adapter").eval()
    projector = {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
    again.projector.load_state_dict(projector)
    # Through the trainable state dict alone.
    fresh = _head(lms[arch], regime="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0).eval()
    fresh.load_trainable_state_dict(torch.load(tmp_path / "trainable.pt"))
    with torch.no_grad():
        torch.testing.assert_close(again(fused, PROMPTS, all_logits=True).logits, expected)
        torch.testing.assert_close(fresh(fused, PROMPTS, all_logits=True).logits, expected)
    assert again.generate(fused, PROMPTS, 3) == head.generate(fused, PROMPTS, 3)  # decoding through peft


def test_fingerprint_refuses_another_lm_naming_what_differs(lms, tmp_path):
    head = _head(lms["llama"], regime="full")
    saved = head.lm_fingerprint()
    _step(head)  # training does not move the fingerprint: it is the LM as loaded
    assert head.lm_fingerprint() == saved
    check_lm_fingerprint(saved, _head(lms["llama"]).lm_fingerprint())
    reseeded = _head(build_tiny_lm(tmp_path / "llama_seed1", "llama", seed=1)).lm_fingerprint()
    with pytest.raises(ValueError, match="weights_sha256") as err:
        check_lm_fingerprint(saved, reseeded)
    assert "config." not in str(err.value)
    with pytest.raises(ValueError, match=r"config\.model_type \('llama' != 'gpt2'\)") as err:
        check_lm_fingerprint(saved, _head(lms["gpt2"]).lm_fingerprint())
    assert "weights_sha256" in str(err.value) and "gpt2" in str(err.value)
    with pytest.raises(ValueError, match="missing"):
        head.load_trainable_state_dict({k: v for k, v in head.trainable_state_dict().items() if "projector" in k})


def test_prompts_and_input_checks(lms):
    head = _head(lms["gpt2"], prompt_template="Hypothesis: {hypothesis} True or false?")
    assert head.prompts([{"hypothesis": "a dog runs", "label": 1}]) == ["Hypothesis: a dog runs True or false?"]
    with pytest.raises(KeyError, match="'question'.*'caption'"):
        format_prompt("Question: {question}", {"caption": "x"})
    with pytest.raises(ValueError, match="Single '}'"):
        _head(lms["gpt2"], prompt_template="oops }")
    with pytest.raises(ValueError, match="width=16"):
        head(fused_tokens(1, width=8), PROMPTS[:1])
    with pytest.raises(ValueError, match="1 prompts for a batch of 2"):
        head(fused_tokens(2), PROMPTS[:1])
    with pytest.raises(ValueError, match="adapter_path"):
        _head(lms["gpt2"], regime="full", adapter_path="x")
