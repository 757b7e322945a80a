"""Prompts for every (backend, prompt style, task, method), each with a version recorded on its labels.

Prompts live here, not in the backends, so a change to any wording is one edit in one file and is
forced to come with a new PROMPT_VERSIONS entry: the runner skips audio already labelled with the same
(task, model, revision, prompt version), so an unversioned prompt change would silently mix results.
A question or language other than the default adds a short digest to the version for the same reason.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Literal

from qwen_tasks.records import DEFAULT_LANGUAGE, DEFAULT_QUESTION, LANGUAGE_PATTERN, CryMethod, LabelRequest

PromptStyle = Literal["chat", "base"]

LANGUAGE_NAMES = {
    "en": "English",
    "zh": "Chinese",
    "de": "German",
    "es": "Spanish",
    "fr": "French",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "ru": "Russian",
    "yue": "Cantonese",
}

# Bump the version whenever the wording of that prompt changes.
PROMPT_VERSIONS: dict[tuple[str, str, str], str] = {
    # Qwen2-Audio (transformers). Instruct model: ChatML chat template; base model: raw text after the audio.
    ("qwen2-audio-chat", "asr", "generate"): "q2a-chat-asr-v1",
    ("qwen2-audio-chat", "cry", "score"): "q2a-chat-cry-score-v1",
    ("qwen2-audio-chat", "cry", "generate"): "q2a-chat-cry-gen-v1",
    ("qwen2-audio-chat", "cry", "both"): "q2a-chat-cry-both-v1",
    ("qwen2-audio-base", "asr", "generate"): "q2a-base-asr-v1",
    ("qwen2-audio-base", "cry", "score"): "q2a-base-cry-score-v1",
    ("qwen2-audio-base", "cry", "generate"): "q2a-base-cry-gen-v1",
    ("qwen2-audio-base", "cry", "both"): "q2a-base-cry-both-v1",
    # Original Qwen-Audio (trust_remote_code): the prompts of its eval_audio/ scripts.
    ("qwen-audio-base", "asr", "generate"): "qa-eval-asr-v1",
    ("qwen-audio-base", "cry", "score"): "qa-eval-aqa-score-v1",
    ("qwen-audio-base", "cry", "generate"): "qa-eval-aqa-gen-v1",
    ("qwen-audio-base", "cry", "both"): "qa-eval-aqa-both-v1",
    ("qwen-audio-chat", "asr", "generate"): "qa-chat-asr-v1",
    ("qwen-audio-chat", "cry", "score"): "qa-chat-cry-score-v1",
    ("qwen-audio-chat", "cry", "generate"): "qa-chat-cry-gen-v1",
    ("qwen-audio-chat", "cry", "both"): "qa-chat-cry-both-v1",
}

QWEN2_AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"
QWEN_AUDIO_ASR_TEMPLATE = (
    "<audio>{path}</audio><|startoftranscript|><|{lang}|><|transcribe|><|{lang}|><|notimestamps|><|wo_itn|>"
)
QWEN_AUDIO_AQA_TEMPLATE = "<audio>{path}</audio><|startofanalysis|><|en|><|question|>{question}<|answer|>"
QWEN_AUDIO_CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nAudio 1:<audio>{path}</audio>\n{text}<|im_end|>\n<|im_start|>assistant\n"
)

_TAG_RE = re.compile(r"<\|[^|<>]*\|>")


@dataclass(frozen=True)
class PromptSpec:
    """What a backend needs to build prompts for one request, and what is recorded on the labels."""

    key: tuple[str, str, str]
    version: str
    text: str  # instruction text (chat) or full text after the audio (base); no audio placeholder


def method_key(request: LabelRequest) -> str:
    """ASR always generates; cry detection is keyed by its method set (score, generate or both)."""
    if request.task == "asr":
        return "generate"
    methods = set(request.methods)
    if methods == {"score"}:
        return "score"
    if methods == {"generate"}:
        return "generate"
    return CryMethod.BOTH.value


def check_language(language: str) -> str:
    """Language codes are inserted into special tokens: accept only plain short codes."""
    if not re.fullmatch(LANGUAGE_PATTERN.strip("^$"), language):
        raise ValueError(f"language must be a 2-3 letter code such as 'en' or 'zh', got {language!r}")
    return language


def _version(key: tuple[str, str, str], request: LabelRequest) -> str:
    base = PROMPT_VERSIONS[key]
    custom = []
    if request.task == "asr" and request.language != DEFAULT_LANGUAGE:
        custom.append(f"lang={request.language}")
    if request.task == "cry" and request.question != DEFAULT_QUESTION:
        custom.append(f"q={request.question}")
    if not custom:
        return base
    return f"{base}+{hashlib.sha256('|'.join(custom).encode()).hexdigest()[:8]}"


def qwen2_audio_spec(request: LabelRequest, style: PromptStyle) -> PromptSpec:
    """Prompt text for Qwen2-Audio. Chat: the user turn's text; base: the raw text after the audio."""
    lang = check_language(request.language)
    if request.task == "asr":
        if style == "chat":
            name = LANGUAGE_NAMES.get(lang, lang)
            text = f"Transcribe the speech in this audio in {name}. Output only the transcript."
        else:
            text = f"Detect the language and recognize the speech: <|{lang}|>"
    else:
        text = request.question.strip()
        if not text:
            raise ValueError("question must not be empty")
        if style == "base":
            text = f"{text} Answer:"
    key = (f"qwen2-audio-{style}", request.task, method_key(request))
    return PromptSpec(key=key, version=_version(key, request), text=text)


def qwen2_audio_messages(spec: PromptSpec) -> list[dict[str, Any]]:
    """The conversation rendered by the Instruct model's own chat template (one audio, one question)."""
    return [
        {"role": "user", "content": [{"type": "audio", "audio": "clip"}, {"type": "text", "text": spec.text}]}
    ]


def qwen2_audio_base_prompt(spec: PromptSpec) -> str:
    """Base-model prompt: the audio placeholder followed by the raw instruction."""
    return f"{QWEN2_AUDIO_PLACEHOLDER}{spec.text}"


def qwen_audio_spec(request: LabelRequest, style: PromptStyle) -> PromptSpec:
    """Original Qwen-Audio: `text` is a template with `{path}` for the audio file of each clip."""
    lang = check_language(request.language)
    question = request.question.strip()
    if request.task == "cry" and not question:
        raise ValueError("question must not be empty")
    if style == "base":
        if request.task == "asr":
            text = QWEN_AUDIO_ASR_TEMPLATE.replace("{lang}", lang)
        else:
            text = QWEN_AUDIO_AQA_TEMPLATE.replace("{question}", _escape_braces(question))
    else:
        name = LANGUAGE_NAMES.get(lang, lang)
        instruction = (
            f"Transcribe the speech in this audio in {name}. Output only the transcript."
            if request.task == "asr"
            else question
        )
        text = QWEN_AUDIO_CHAT_TEMPLATE.replace("{text}", _escape_braces(instruction))
    key = (f"qwen-audio-{style}", request.task, method_key(request))
    return PromptSpec(key=key, version=_version(key, request), text=text)


def qwen_audio_prompt(spec: PromptSpec, audio_path: str) -> str:
    """Fill the audio path into an original Qwen-Audio prompt (its tokenizer reads the file itself)."""
    if "<" in audio_path or ">" in audio_path:
        raise ValueError(
            f"{audio_path}: path contains '<' or '>', which Qwen-Audio's prompt format cannot carry"
        )
    return spec.text.format(path=audio_path)


def _escape_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def strip_special_tags(text: str) -> str:
    """Remove `<|...|>` tags and collapse whitespace, as the Qwen-Audio eval scripts do."""
    return " ".join(_TAG_RE.sub(" ", text).split())
