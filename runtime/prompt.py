"""LLaVA's conversation templates and ``<image>`` expansion.

``vicuna_v1`` (LLaVA-1.5, p-MoD, gamma-MoD) renders
``"{system} USER: <image>\\n{question} ASSISTANT:"``, turns closed by ``</s>``.
The prompt is tokenised in chunks split at ``<image>``, each chunk with BOS, the BOS of all but
the first dropped (LLaVA's ``tokenizer_image_token``); the image's features take the place of
the ``<image>`` marker.
"""

from __future__ import annotations

from dataclasses import dataclass

from gammamod.errors import GammamodError

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id in input_ids


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str

    def render(self, turns: list[tuple[str, str | None]], system: str | None = None) -> str:
        """LLaVA's ``SeparatorStyle.TWO``: ``turns`` are (role, text) pairs, the last one's text
        None to leave the assistant's answer open. ``system`` replaces the template's system prompt."""
        seps = (self.sep, self.sep2)
        out = (self.system if system is None else system) + seps[0]
        for i, (role, text) in enumerate(turns):
            out += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
        return out

    def prompt(self, question: str, has_image: bool = True, history: list[tuple[str, str]] = (),
               system: str | None = None) -> str:
        """One user question (with the image in the first turn, where the question does not place
        ``<image>`` itself), history as (question, answer); ``system`` replaces the system prompt."""
        user, assistant = self.roles
        turns: list[tuple[str, str | None]] = []
        for i, (q, a) in enumerate(history):
            turns += [(user, _with_image(q, has_image and i == 0)), (assistant, a)]
        turns += [(user, _with_image(question, has_image and not history)), (assistant, None)]
        return self.render(turns, system)

    def continuation(self, question: str) -> str:
        """The text that follows an assistant's answer in the next turn: ``</s>USER: q ASSISTANT:``."""
        user, assistant = self.roles
        return f"{self.sep2}{user}: {question}{self.sep}{assistant}:"

    def to_dict(self) -> dict:
        return {"name": self.name, "system": self.system, "roles": list(self.roles), "sep": self.sep,
                "sep2": self.sep2, "style": "two"}

    @classmethod
    def from_dict(cls, d: dict) -> "Template":
        return cls(d["name"], d["system"], tuple(d["roles"]), d["sep"], d["sep2"])


def _with_image(text: str, has_image: bool) -> str:
    """LLaVA puts the image first in the user's turn; a question that says where its images go
    (``<image>`` markers) keeps them there."""
    if not has_image or IMAGE_TOKEN in text:
        return text
    return f"{IMAGE_TOKEN}\n{text.strip()}"


VICUNA_V1 = Template(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>")

TEMPLATES = {VICUNA_V1.name: VICUNA_V1}


def template(name: str) -> Template:
    if name not in TEMPLATES:
        raise GammamodError(f"conversation template {name!r}: expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def tokenize_with_image(tokenizer, prompt: str) -> list[int]:
    """LLaVA's ``tokenizer_image_token``: ids with ``IMAGE_TOKEN_INDEX`` where ``<image>`` was."""
    chunks = [tokenizer.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and tokenizer.add_bos and chunks[0][0] == tokenizer.bos_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def image_positions(ids: list[int]) -> list[int]:
    return [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]


def routable_span(kind: str, blocks: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The routed span (start, length) of a prompt whose images sit at ``blocks`` [(start, tokens)]
    (positions after expansion), for the recipe's span ``kind``: "prefix" (gamma-MoD: the system
    prompt and the images, everything before the question) or "image" (p-MoD: the image tokens,
    which must then be adjacent: text between images is never routed). None without images."""
    if not blocks:
        return None
    blocks = sorted(blocks)
    end = blocks[-1][0] + blocks[-1][1]
    if kind == "prefix":
        return (0, end)
    if kind != "image":
        raise GammamodError(f"routed span kind {kind!r}: expected prefix or image")
    start = blocks[0][0]
    if sum(n for _, n in blocks) != end - start:
        raise GammamodError("p-MoD routes image tokens only, and one routed span per prompt: put several images "
                            "next to each other (no text between them)")
    return (start, end - start)
