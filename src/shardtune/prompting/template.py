"""Prompt templates: the recipe's template language, parsed and rendered into token ids.

    "Review: {text} Sentiment: {mask}"               words, an input field, the label slot
    "{sentence1} ? {mask} , {sentence2}"             any column is a field (a pair task)
    "{soft:4} {text} It was {mask}."                 4 trained soft tokens
    "{soft:It was} {mask} . {text}"                  soft tokens initialised from words

`{mask}` is where the model predicts the label word: the masked position of a masked LM,
the next token after the prompt for a causal LM (so it must end the template), the
decoder's first tokens for an encoder-decoder. `{soft}` is one soft token, `{soft:N}` N of
them, `{soft:words}` one per token of the words, starting from their embeddings.

Text and fields are rendered into one string between soft tokens and the slot, so a BPE
tokenizer sees the spaces it was trained with. When a whitespace precedes `{mask}`
in a causal or encoder-decoder template, it moves into the label words (" positive"), as
those tokenizers spell a word after a space differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SLOT = re.compile(r"\{([^{}]*)\}")
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
CONTENT_FREE = "N/A"  # what fills every field for calibration (Zhao et al. 2021)


@dataclass(frozen=True)
class Piece:
    kind: str  # "text", "field", "mask" or "soft"
    value: str = ""  # the text, the field's name, or the words a soft run starts from
    count: int = 0  # soft tokens in a {soft:N} run (words: decided by the tokenizer)


def parse(template: str) -> list[Piece]:
    """The template's pieces; ValueError saying what is wrong and how to write it."""
    pieces: list[Piece] = []
    position = 0
    for match in SLOT.finditer(template):
        if match.start() > position:
            pieces.append(Piece("text", template[position:match.start()]))
        inner = match.group(1).strip()
        name, _, argument = inner.partition(":")
        if inner == "mask":
            pieces.append(Piece("mask"))
        elif name.strip() == "soft":
            argument = argument.strip()
            if not argument:
                pieces.append(Piece("soft", count=1))
            elif argument.isdigit():
                if not 1 <= int(argument) <= 128:
                    raise ValueError(f"{{soft:{argument}}}: give 1 to 128 soft tokens")
                pieces.append(Piece("soft", count=int(argument)))
            else:
                pieces.append(Piece("soft", value=argument))
        elif FIELD_NAME.match(inner):
            pieces.append(Piece("field", inner))
        else:
            raise ValueError(f"'{{{match.group(1)}}}' is not a slot: use {{mask}}, {{soft}}, {{soft:N}}, "
                             "{soft:words} or {column_name}")
        position = match.end()
    if position < len(template):
        pieces.append(Piece("text", template[position:]))
    stray = [p.value for p in pieces if p.kind == "text" and ("{" in p.value or "}" in p.value)]
    if stray:
        raise ValueError(f"unbalanced brace in '{stray[0]}'")
    masks = sum(p.kind == "mask" for p in pieces)
    if masks != 1:
        raise ValueError(f"needs exactly one {{mask}} (the label slot), found {masks}: e.g. "
                         "'Review: {text} Sentiment: {mask}'")
    if not any(p.kind == "field" for p in pieces):
        raise ValueError("names no input field: add the column the model should read, e.g. {text}")
    return pieces


def fields(pieces: list[Piece]) -> list[str]:
    return list(dict.fromkeys(p.value for p in pieces if p.kind == "field"))


def mask_ends(pieces: list[Piece]) -> bool:
    after = pieces[pieces.index(Piece("mask")) + 1:]
    return all(p.kind == "text" and not p.value.strip() for p in after)


def space_before_mask(pieces: list[Piece]) -> bool:
    before = pieces[pieces.index(Piece("mask")) - 1] if pieces.index(Piece("mask")) else None
    return before is not None and before.kind == "text" and before.value[-1:].isspace()


def word_ids(tokenizer, text: str, space: bool = False) -> list[int]:
    return list(tokenizer(((" " if space else "") + text), add_special_tokens=False)["input_ids"])


@dataclass
class Rendered:
    input_ids: list[int]
    soft_index: list[int]  # per position: the soft token it is (index into the prompt's table), or -1
    slot: int  # the position whose output scores the label words
    decoder_input_ids: list[int] | None = None  # encoder-decoder: the decoder's prompt


class TemplateRenderer:
    """Renders one template for one tokenizer and model family."""

    def __init__(self, pieces: list[Piece], tokenizer, family: str, max_length: int, soft_start: int,
                 chat: bool = False, decoder_start: int | None = None):
        self.pieces, self.tokenizer, self.family, self.max_length = pieces, tokenizer, family, max_length
        self.chat, self.decoder_start = chat, decoder_start
        self.space = space_before_mask(pieces) and family != "masked_lm" and not chat
        self.soft_runs = []  # per soft piece: its table indices
        for piece in pieces:
            if piece.kind == "soft":  # {soft:N}: N tokens; {soft:words}: one per token of the words
                n = piece.count or len(word_ids(tokenizer, piece.value))
                self.soft_runs.append(list(range(soft_start, soft_start + n)))
                soft_start += n
        self.prefix, self.suffix = self._frame()
        self.sentinel = self._slot_token()

    def _frame(self) -> tuple[list[int], list[int]]:
        """Tokens around the prompt: the tokenizer's special tokens ([CLS] .. [SEP], BOS), or
        for chat: the chat template up to the user's message and from its end."""
        tok = self.tokenizer
        if self.chat:
            marker = "\u0000PROMPT\u0000"
            text = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                           tokenize=False)
            before, after = text.split(marker)
            return word_ids(tok, before), word_ids(tok, after)
        bare = word_ids(tok, "x")
        full = list(tok("x")["input_ids"])
        for start in range(len(full) - len(bare) + 1):
            if full[start:start + len(bare)] == bare:
                prefix, suffix = full[:start], full[start + len(bare):]
                # A causal LM predicts right after the prompt: an EOS there would be read instead.
                return prefix, ([] if self.family == "causal_lm" else suffix)
        return [], []

    def _slot_token(self) -> int | None:
        """What stands at {mask} in the model's input: [MASK] for a masked LM; T5's first
        sentinel (else the mask token, else nothing) for an encoder-decoder."""
        tok = self.tokenizer
        if self.family == "masked_lm":
            return tok.mask_token_id
        if self.family == "seq2seq":
            sentinel = tok.convert_tokens_to_ids("<extra_id_0>") if "<extra_id_0>" in tok.get_vocab() else None
            return sentinel if sentinel is not None else tok.mask_token_id
        return None

    def render(self, values: dict[str, str]) -> Rendered:
        """Token ids for one row's field values, the longest field cut until the prompt fits."""
        values = dict(values)
        for _ in range(8):
            rendered = self._render(values)
            overflow = len(rendered.input_ids) - self.max_length
            if overflow <= 0:
                return rendered
            longest = max(values, key=lambda f: len(word_ids(self.tokenizer, values[f])))
            ids = word_ids(self.tokenizer, values[longest])
            values[longest] = self.tokenizer.decode(ids[:max(1, len(ids) - overflow - 1)])
        raise ValueError(f"the template's own tokens do not fit data.max_length={self.max_length}; "
                         "raise max_length or shorten the template")

    def _render(self, values: dict[str, str]) -> Rendered:
        ids, soft, slot = list(self.prefix), [-1] * len(self.prefix), None
        text = ""
        runs = iter(self.soft_runs)

        def flush(strip: bool = False):
            nonlocal text
            chunk = text.rstrip() if strip else text
            if chunk:
                new = word_ids(self.tokenizer, chunk)
                ids.extend(new)
                soft.extend([-1] * len(new))
            text = ""

        for piece in self.pieces:
            if piece.kind == "text":
                text += piece.value
            elif piece.kind == "field":
                text += values[piece.value]
            elif piece.kind == "soft":
                flush()
                run = next(runs)
                ids.extend([self.tokenizer.pad_token_id] * len(run))  # placeholders; the embeddings are replaced
                soft.extend(run)
            else:  # the label slot
                flush(strip=self.space or self.chat)
                if self.family == "causal_lm":
                    break  # the last position predicts the next token: the label word
                if self.sentinel is not None:
                    slot = len(ids)
                    ids.append(self.sentinel)
                    soft.append(-1)
        flush()
        ids.extend(self.suffix)
        soft.extend([-1] * len(self.suffix))
        decoder = None
        if self.family == "causal_lm":
            slot = len(ids) - 1
        elif self.family == "seq2seq":
            decoder = [self.decoder_start] + ([self.sentinel] if self.sentinel is not None and
                                                 self.sentinel != self.tokenizer.mask_token_id else [])
            slot = len(decoder) - 1
        return Rendered(ids, soft, slot, decoder)
