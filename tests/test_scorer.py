"""VLRewardScorer: parity with the text RM, batching, padding, prefix reuse, modes and bad input."""

from __future__ import annotations

import json
import shutil
from unittest import mock

import pytest
import torch
from _helpers import recipe

from vlrm_rlhf.merge import build
from vlrm_rlhf.models.families import UnknownFamilyError
from vlrm_rlhf.reward.inputs import InputError
from vlrm_rlhf.reward.scorer import FIXED_DATE, ScorerError, VLRewardScorer, render
from vlrm_rlhf.testing.zoo import FAMILIES, demo_image

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the car ?"}]}]
RESPONSES = ["the car is red .", "blue", "it is a big green car with a dog .", "no"]


@pytest.fixture(scope="module")
def vlrm(zoo, tmp_path_factory):
    """(trio, VLRM dir) per family: task arithmetic λ_L = 0.5, λ_R = 1."""
    cache = {}

    def get(family):
        if family not in cache:
            trio = zoo(family)
            out = tmp_path_factory.mktemp(f"vlrm_{family}") / "vlrm"
            build(recipe(trio, "task_arithmetic", lvlm={"weight": 0.5}, rm={"weight": 1.0}), out, progress=False)
            cache[family] = trio, out
        return cache[family]

    return get


def test_text_only_reward_equals_text_rm_exactly(zoo, tmp_path):
    trio = zoo("llava")
    out = build(recipe(trio, lvlm={"weight": 0.0}, rm={"weight": 1.0}), tmp_path / "v", progress=False)
    v = VLRewardScorer.from_pretrained(out)
    t = VLRewardScorer.from_pretrained(trio["rm"], mode="text_rm")
    prompts = ["what is the color of the car ?", [{"role": "user", "content": "is this a dog ?"}]]
    responses = ["the car is red .", [{"role": "assistant", "content": "yes it is a dog ."}]]
    a, b = v.score(prompts=prompts, responses=responses), t.score(prompts=prompts, responses=responses)
    assert a == b, (a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_single_prefix_equals_plain_and_images_matter(vlrm, family):
    trio, out = vlrm(family)
    sc = VLRewardScorer.from_pretrained(out)
    im, im2 = demo_image(trio["lvlm"], 0), demo_image(trio["lvlm"], 1)
    plain = sc.score(prompts=[PROMPT] * 4, responses=RESPONSES, images=[[im]] * 4)
    single = [sc.score(prompts=[PROMPT], responses=[r], images=[[im]])[0] for r in RESPONSES]
    reuse = sc.score_candidates(PROMPT, RESPONSES, [im])
    assert max(abs(a - b) for a, b in zip(plain, single)) < 1e-5
    assert max(abs(a - b) for a, b in zip(plain, reuse)) < 1e-4
    other = sc.score(prompts=[PROMPT] * 4, responses=RESPONSES, images=[[im2]] * 4)
    no_img = VLRewardScorer.from_pretrained(out, mode="no_image").score(prompts=[PROMPT] * 4, responses=RESPONSES,
                                                                        images=[[im]] * 4)
    assert max(abs(a - b) for a, b in zip(plain, other)) > 1e-6, "a different image must change the reward"
    assert max(abs(a - b) for a, b in zip(plain, no_img)) > 1e-6, "removing the image must change the reward"


def test_prefix_reuse_runs_the_prompt_once(vlrm):
    trio, out = vlrm("llava")
    sc = VLRewardScorer.from_pretrained(out)
    im = demo_image(trio["lvlm"], 0)
    vision = sc.model.model.vision_tower
    with mock.patch.object(vision, "forward", wraps=vision.forward) as spy:
        sc.score_candidates(PROMPT, RESPONSES, [im])
    assert spy.call_count == 1, "images must be encoded once for all candidates"


def test_left_and_right_padding_agree(vlrm):
    trio, out = vlrm("llava")
    im = demo_image(trio["lvlm"], 0)
    res = {}
    for side in ("left", "right"):
        sc = VLRewardScorer.from_pretrained(out)
        sc.tokenizer.padding_side = side
        res[side] = sc.score(prompts=[PROMPT] * 4, responses=RESPONSES, images=[[im]] * 4)
    assert max(abs(a - b) for a, b in zip(res["left"], res["right"])) < 1e-5


def test_token_budget_micro_batches_give_the_same_rewards(vlrm):
    trio, out = vlrm("llava")
    im = demo_image(trio["lvlm"], 0)
    big = VLRewardScorer.from_pretrained(out)
    small = VLRewardScorer.from_pretrained(out, max_batch_tokens=20)
    with mock.patch.object(small.model, "forward", wraps=small.model.forward) as spy:
        a = small.score(prompts=[PROMPT] * 4, responses=RESPONSES, images=[[im]] * 4)
    assert spy.call_count >= 3
    b = big.score(prompts=[PROMPT] * 4, responses=RESPONSES, images=[[im]] * 4)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_inputs_zero_one_or_several_images_inline_or_listed(vlrm):
    trio, out = vlrm("llava")
    sc = VLRewardScorer.from_pretrained(out)
    im, im2 = demo_image(trio["lvlm"], 0), demo_image(trio["lvlm"], 1)
    inline = [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "what color ?"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "red ."}]}]
    listed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]},
              {"role": "assistant", "content": "red ."}]
    a = sc.score([inline])
    b = sc.score([listed], images=[[im]])
    c = sc.score(prompts=["what color ?"], responses=["red ."], images=[[im]])  # string prompt + image
    assert a == b and abs(a[0] - c[0]) < 1e-6
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "same ?"}]}]
    r2 = sc.score(prompts=[two, "same ?"], responses=["no .", "no ."], images=[[im, im2], None])
    assert all(map(lambda x: x == x, r2)) and r2[0] != r2[1]


def test_truncation_cuts_the_prompt_never_the_response(vlrm):
    trio, out = vlrm("llava")
    sc = VLRewardScorer.from_pretrained(out, max_length=30)
    long_prompt = "what is the color of the car " * 8 + "?"
    with pytest.warns(UserWarning, match="prompt truncated by"):
        r = sc.score(prompts=[long_prompt], responses=["the car is red ."])
    with mock.patch.object(sc.model, "forward", wraps=sc.model.forward) as spy, pytest.warns(UserWarning):
        sc.score(prompts=[long_prompt], responses=["the car is red ."])
    assert spy.call_args.kwargs["input_ids"].shape[1] <= 30, "the forward must see the truncated text"
    assert r[0] == r[0]
    with pytest.raises(InputError, match="sample 0: the response .* longer than the context"):
        sc.score(prompts=["what ?"], responses=["the car is red . " * 20])


def test_cascade_and_text_rm_modes(zoo, vlrm):
    trio, _ = vlrm("llava")
    im = demo_image(trio["lvlm"], 0)
    cas = VLRewardScorer.from_pretrained(trio["rm"], mode="cascade", lvlm=trio["lvlm"], caption_max_new_tokens=4)
    r = cas.score(prompts=[PROMPT], responses=["red ."], images=[[im]])
    assert len(cas._captions) == 1 and r[0] == r[0]
    txt = VLRewardScorer.from_pretrained(trio["rm"], mode="text_rm")
    assert txt.score(prompts=[PROMPT], responses=["red ."], images=[[im]]) == txt.score(prompts=["what color is the car ?"], responses=["red ."])


def test_bad_inputs_name_the_culprit(vlrm, tmp_path):
    trio, out = vlrm("llava")
    sc = VLRewardScorer.from_pretrained(out)
    im = demo_image(trio["lvlm"], 0)
    with pytest.raises(InputError, match="sample 0: image file not found: .*nope.png"):
        sc.score(prompts=["what ?"], responses=["red ."], images=[[str(tmp_path / "nope.png")]])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read image file .*bad.png"):
        sc.score(prompts=["what ?"], responses=["red ."], images=[[str(tmp_path / "bad.png")]])
    with pytest.raises(InputError, match="sample 1: 2 image\\(s\\) for 1 image placeholder"):
        sc.score(prompts=[PROMPT, PROMPT], responses=["a", "b"], images=[[im], [im, im]])
    with pytest.raises(InputError, match="sample 0: empty response"):
        sc.score(prompts=[PROMPT], responses=["  "], images=[[im]])
    with pytest.raises(ScorerError, match="text reward model .*mode vlrm needs a VLRM"):
        VLRewardScorer.from_pretrained(trio["rm"])
    bad = tmp_path / "unknown"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "paligemma"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownFamilyError, match="paligemma.*Supported families: llava"):
        VLRewardScorer.from_pretrained(bad)


def test_non_finite_reward_is_logged(vlrm):
    trio, out = vlrm("llava")
    sc = VLRewardScorer.from_pretrained(out)
    with torch.no_grad():
        sc.model.score.weight.fill_(float("nan"))
    with pytest.warns(UserWarning, match="non-finite reward for sample"):
        r = sc.score(prompts=["what ?"], responses=["red ."])
    assert r[0] != r[0]


def test_templates_are_date_independent(vlrm):
    _, out = vlrm("llava")
    sc = VLRewardScorer.from_pretrained(out, mode="no_image")
    tok = sc.tokenizer
    tok.chat_template = "{{ strftime_now('%d %b %Y') }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert render(tok, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], plain_text=True).startswith(
        FIXED_DATE.strftime("%d %b %Y"))
    tok.chat_template = "{{ date_string }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert render(tok, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], plain_text=True).startswith("26 Jul 2024")


def test_trl_1_12_get_reward_protocol(vlrm):
    """TRL 1.12's PPO scored with get_reward(model, query_responses, pad_token_id, context_length):
    the backbone at ``base_model_prefix`` with cumsum positions, then ``.score`` at the token before the first
    pad after the context. A VLRM must fit it and agree with its own forward on text-only, right-padded input."""
    from transformers import AutoModelForSequenceClassification

    _, out = vlrm("llava")
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    pad = model.config.get_text_config().pad_token_id
    qr = torch.tensor([[1, 9, 10, 11, 12, 13, 2], [1, 9, 10, 14, 2, pad, pad]])
    context_length = 3

    def first_true_indices(bools):
        row_len = bools.size(-1)
        zero_or_index = row_len * (~bools).type(torch.long) + torch.arange(row_len, device=bools.device)
        return torch.min(zero_or_index, dim=-1).values

    with torch.no_grad():
        attention_mask = qr != pad
        position_ids = attention_mask.cumsum(1) - attention_mask.long()
        backbone = getattr(model, model.base_model_prefix)
        output = backbone(input_ids=torch.masked_fill(qr, ~attention_mask, 0), attention_mask=attention_mask,
                          position_ids=position_ids, return_dict=True, output_hidden_states=True, use_cache=False)
        reward_logits = model.score(output.hidden_states[-1])
        seq_len = first_true_indices(qr[:, context_length:] == pad) - 1 + context_length
        trl_reward = reward_logits[torch.arange(2), seq_len].squeeze(-1)
        ours = model(input_ids=qr, attention_mask=attention_mask, use_cache=False).logits[:, 0]
    torch.testing.assert_close(trl_reward, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["transformers", "hub"])
@pytest.mark.parametrize("family", FAMILIES)
def test_wrapping_an_lvlm_only_misses_the_score_head(zoo, family, layout):
    """The silent random-init trap: our classes must apply the family's renaming rules (hub layout)."""
    from transformers import AutoModelForImageTextToText

    from vlrm_rlhf.models.modeling import vlrm_from_lvlm

    trio = zoo(family, layout)
    vlrm = vlrm_from_lvlm(str(trio["lvlm"]))
    lvlm = AutoModelForImageTextToText.from_pretrained(trio["lvlm"])
    ours = dict(vlrm.named_parameters())
    for k, v in lvlm.named_parameters():
        if k in ours:
            assert torch.equal(ours[k], v), k
    assert sum(k in ours for k, _ in lvlm.named_parameters()) >= len(ours) - 1


def test_wrapping_refuses_a_checkpoint_whose_language_model_would_be_random(zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    from vlrm_rlhf.models.modeling import LoadingError, vlrm_from_lvlm

    src = zoo("qwen2_vl", "hub")["lvlm"]
    bad = tmp_path / "lvlm"
    shutil.copytree(src, bad)
    sd = load_file(bad / "model.safetensors")
    save_file({k.replace("model.", "decoder.", 1) if k.startswith("model.") else k: v for k, v in sd.items()},
              bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadingError, match="were not found in the checkpoint"):
        vlrm_from_lvlm(str(bad))
