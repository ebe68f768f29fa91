"""Chat tokenisation with response-only labels: the one template rule of every job.

``model.template`` (``auto|chat|default``) is resolved once per tokenizer by
:func:`use_template`: ``auto`` takes the tokenizer's own chat template when it has one, else
``DEFAULT_CHAT_TEMPLATE`` (the LLaMA-Factory ``default`` layout: ``Human: ...\\nAssistant:\\n...``);
``chat`` requires the tokenizer's template; ``default`` always uses ours. The resolved template
is installed on the tokenizer, so every render below (SFT rows, eval perplexity and prompts,
select's scorers and embedder, GRPO prompts, prune calibration) sees the same text, and a
saved tokenizer carries the template the model was trained with. Labels are -100 on
system/user tokens and on template scaffolding; only assistant content (plus the template's
end-of-turn token) is trained on or scored.

How spans are found, for any template: render the conversation prefix up to each assistant
turn with ``add_generation_prompt=True`` and the prefix including it; the characters between
are that assistant turn. Tokens whose offsets fall inside such a span get labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

IGNORE_INDEX = -100

# Documented default: system text, then "Human: <user>\nAssistant:\n<assistant><eos>\n".
# Why the newline after "Assistant:": with byte-level BPE a trailing space would merge into the
# first response token, so the prompt alone would tokenise differently from prompt+response.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}Human: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Assistant:\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)


TemplateMode = Literal["auto", "chat", "default"]


class TemplateError(ValueError):
    pass


def resolve_template(tokenizer, mode: TemplateMode = "auto") -> tuple[str, str]:
    """``(template text, "chat" | "default")`` for ``model.template=mode``.

    Raises:
        TemplateError: ``mode`` is ``chat`` and the tokenizer has no chat template.
    """
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the one transformers uses by default
        own = own.get("default")
    if mode not in ("auto", "chat", "default"):
        raise TemplateError(f"model.template: must be auto, chat or default (got {mode!r})")
    if mode == "default" or (mode == "auto" and (not own or own == DEFAULT_CHAT_TEMPLATE)):
        return DEFAULT_CHAT_TEMPLATE, "default"
    if not own:
        raise TemplateError("model.template: chat, but the tokenizer has no chat template "
                            "(use auto or default)")
    return own, "chat"


def use_template(tokenizer, mode: TemplateMode = "auto"):
    """Install the template ``mode`` resolves to on ``tokenizer`` (in place) and return it.

    ``tokenizer.effsft_template`` records the resolved name (``chat`` / ``default``) for
    manifests; :func:`template_info` reports it with a hash of the text.
    """
    text, name = resolve_template(tokenizer, mode)
    tokenizer.chat_template = text
    tokenizer.effsft_template = name
    return tokenizer


def template_info(tokenizer) -> dict:
    """What a manifest records about the template a job used."""
    import hashlib

    text = template_of(tokenizer)
    return {"template": getattr(tokenizer, "effsft_template", None) or resolve_template(tokenizer)[1],
            "template_sha": hashlib.sha256(text.encode()).hexdigest()[:16]}


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_prompt: int              # tokens before the first trained token
    n_response: int            # tokens with a label
    truncated: bool = False    # prompt tokens were cut from the left
    too_long: bool = False     # the response alone does not fit: row is dropped, and counted


def template_of(tokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), chat_template=template_of(tokenizer),
                                         tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_text(tokenizer, messages: Sequence[dict]) -> str:
    """Everything before the final assistant turn, ending with the generation prompt."""
    return render(tokenizer, messages[:-1], add_generation_prompt=True)


def assistant_spans(tokenizer, messages: Sequence[dict],
                    train_on: Literal["all", "last"] = "all") -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the [start, end) character spans of assistant turns."""
    full = render(tokenizer, messages)
    spans = []
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        idx = idx[-1:]
    for i in idx:
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TemplateError("chat template is not prefix-stable; cannot locate assistant turn "
                                f"{i} (use a template whose renders of a prefix are prefixes)")
        spans.append((len(before), len(upto)))
    return full, spans


def encode_chat(tokenizer, messages: Sequence[dict], max_len: int,
                train_on: Literal["all", "last"] = "all",
                truncation: Literal["left", "drop"] = "left") -> Encoded:
    """Tokenise a conversation with response-only labels.

    Truncation never silently drops the response: with ``left`` the earliest tokens are cut
    while the final assistant turn stays whole; if that turn alone does not fit (or with
    ``drop`` and any overflow) the row is returned with ``too_long=True`` for the caller to
    count and skip.
    """
    return encode_chats(tokenizer, [messages], max_len, train_on, truncation)[0]


def encode_chats(tokenizer, conversations: Sequence[Sequence[dict]], max_len: int,
                 train_on: Literal["all", "last"] = "all",
                 truncation: Literal["left", "drop"] = "left") -> list[Encoded]:
    """:func:`encode_chat` for many conversations with one batched tokenizer call."""
    rendered = [assistant_spans(tokenizer, m, train_on) for m in conversations]
    if not rendered:
        return []
    enc = tokenizer([full for full, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    return [_label(ids, offsets, full, spans, max_len, truncation)
            for ids, offsets, (full, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered)]


def _label(ids: list[int], offsets, full: str, spans: list[tuple[int, int]], max_len: int,
           truncation: str) -> Encoded:
    """Labels from character spans, then the truncation rule of :func:`encode_chat`."""
    ids = list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for t, (a, b) in enumerate(offsets):
        if b <= a:
            continue
        for s, e in spans:
            if a < e and b > s:  # overlap: a token may carry a leading space of the span
                labels[t] = ids[t]
                break
    first = next((t for t, y in enumerate(labels) if y != IGNORE_INDEX), len(ids))
    out = Encoded(ids, labels, first, sum(y != IGNORE_INDEX for y in labels))
    if len(ids) <= max_len:
        return out
    # Start of the final assistant span in tokens: everything from there on must be kept.
    last_start = spans[-1][0] if spans else len(full)
    keep_from = next((t for t, (a, b) in enumerate(offsets) if b > last_start), len(ids))
    cut = len(ids) - max_len
    if truncation == "drop" or cut > keep_from:
        out.too_long = True
        return out
    out.input_ids, out.labels = ids[cut:], labels[cut:]
    out.n_prompt = max(0, first - cut)
    out.n_response = sum(y != IGNORE_INDEX for y in out.labels)
    out.truncated = True
    return out


def encode_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of the prompt for generation (all turns, plus the generation prompt)."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_turns(messages: Sequence[dict]) -> list[dict]:
    """The turns a model answers: everything before the final assistant turn (eval, GRPO)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return list(messages[:last]) if last is not None and last == len(messages) - 1 else list(messages)


def empty_prompt_ids(tokenizer) -> list[int]:
    """The template's generation prompt after an empty user turn: what is left of a prompt
    without its content (IFD's unconditioned pass, s(A))."""
    return encode_prompt(tokenizer, [{"role": "user", "content": ""}])


def collate(encoded: Sequence[Encoded], pad_id: int, side: Literal["right", "left"] = "right"):
    """Pad a list of ``Encoded`` into tensors: input_ids, attention_mask, labels ([B, T])."""
    import torch

    T = max(len(e.input_ids) for e in encoded)
    B = len(encoded)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, sl] = torch.tensor(e.input_ids)
        labels[i, sl] = torch.tensor(e.labels)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
