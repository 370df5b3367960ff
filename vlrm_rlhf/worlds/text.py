"""ShapesWorld text side: a word-level tokenizer with a chat template, the LLaVA processor, and the exact
token layouts the models are trained on.

Layouts (one token per word; ``<ctx>`` holds either a four-word description or four image tokens)::

    text RM / base:  <bos> <ctx> red circle none none </ctx> <q> what colour is the circle ? </q> <a> the answer is red . <eos>
    LVLM:            <bos> <ctx> <image> <image> <image> <image> </ctx> <q> ... </q> <a> ... <eos>
    question only:   <bos> <q> ... </q> <a> ... <eos>

The chat template renders messages to exactly these strings, so every generic tool in the package (scorer,
judge, cascade, TRL trainers) sees what the models were trained on. A text block starting with
``Image description: `` (what the cascade scorer writes), or a string message whose first line does (a text RM's
rendering, which joins blocks into lines), becomes a ``<ctx>`` description; text after its first line is the question.
"""

from __future__ import annotations

from pathlib import Path

from .shapes import IMAGE_SIZE, WORDS

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<ctx>", "</ctx>", "<q>", "</q>", "<a>")
DESCRIPTION_PREFIX = "Image description: "
PATCH = 16
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if m['content'] is string -%}"
    "{%- if m['content'].startswith('" + DESCRIPTION_PREFIX + "') and '\n' in m['content'] -%}"
    "{%- set parts = m['content'][19:].split('\n', 1) %} <ctx> {{ parts[0] }} </ctx> <q> {{ parts[1] }} </q>"
    "{%- else %} <q> {{ m['content'] }} </q>{%- endif -%}"
    "{%- else -%}{%- for b in m['content'] -%}"
    "{%- if b['type'] == 'image' %} <ctx> <image> </ctx>"
    "{%- elif b['text'].startswith('" + DESCRIPTION_PREFIX + "') -%}"
    "{%- set parts = (b['text'][19:] + '\n').split('\n', 1) %} <ctx> {{ parts[0] }} </ctx>"
    "{%- if parts[1].strip() %} <q> {{ parts[1].strip() }} </q>{%- endif -%}"
    "{%- else %} <q> {{ b['text'] }} </q>{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- if m['content'] is string %} <a> {{ m['content'] }}"
    "{%- else %} <a>{% for b in m['content'] %} {{ b['text'] }}{% endfor %}{%- endif %} {{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %} <a>{% endif -%}"
)
assert len(DESCRIPTION_PREFIX) == 19


def build_tokenizer():
    """Word-level fast tokenizer over the world's vocabulary: lower-cases, splits punctuation, no auto-BOS."""
    import tokenizers as tk
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate((*SPECIALS, *WORDS))}
    tok = Tokenizer(tk.models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = tk.normalizers.Lowercase()
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.WhitespaceSplit(), tk.pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, model_input_names=["input_ids", "attention_mask"],
        chat_template=CHAT_TEMPLATE, padding_side="left", model_max_length=64,
    )


def build_processor(tokenizer=None):
    """The LVLM's ``LlavaProcessor``: CLIP-style image preprocessing at 32×32, four image tokens per image."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                            do_center_crop=True, do_resize=True)
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer or build_tokenizer(), patch_size=PATCH,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          image_token="<image>", num_additional_image_tokens=1)


def text_seq(question: str, answer: str | None = None, description: str | None = None, image: bool = False) -> str:
    """One training/eval sequence in the layout above (``image``: the ``<ctx>`` holds image tokens)."""
    parts = ["<bos>"]
    if image:
        parts.append("<ctx> " + " ".join(["<image>"] * N_IMAGE_TOKENS) + " </ctx>")
    elif description is not None:
        parts.append(f"<ctx> {description} </ctx>")
    parts.append(f"<q> {question} </q> <a>")
    if answer is not None:
        parts.append(f"{answer} <eos>")
    return " ".join(parts)


def description_seq(description: str) -> str:
    """A description-only sequence (part of the base LM's pretraining mix)."""
    return f"<bos> <ctx> {description} </ctx> <eos>"


def messages(question: str, answer: str | None = None, *, image: bool = False,
             description: str | None = None) -> list[dict]:
    """The chat messages the template renders to ``text_seq(question, answer, description, image)``."""
    content: list[dict] = []
    if image:
        content.append({"type": "image"})
    if description is not None:
        content.append({"type": "text", "text": DESCRIPTION_PREFIX + description})
    content.append({"type": "text", "text": question})
    out = [{"role": "user", "content": content}]
    if answer is not None:
        out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return out


def save_text_files(tokenizer, out: str | Path) -> None:
    """Write the tokenizer (with its chat template) into a model directory."""
    tokenizer.save_pretrained(out)
