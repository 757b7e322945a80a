"""Prompt building for both backends, incl. the original Qwen-Audio eval-script prompts (not loadable)."""

from __future__ import annotations

import jinja2
import pytest

from qwen_tasks.dev.tiny_model import INSTRUCT_CHAT_TEMPLATE
from qwen_tasks.labelling import prompts
from qwen_tasks.labelling.backends import detect_backend
from qwen_tasks.labelling.backends.qwen2_audio import detect_prompt_style
from qwen_tasks.records import LabelRequest


def test_every_key_has_a_distinct_version() -> None:
    versions = list(prompts.PROMPT_VERSIONS.values())
    assert len(versions) == len(set(versions))


def test_versions_follow_task_method_and_style() -> None:
    score = prompts.qwen2_audio_spec(LabelRequest("cry"), "chat")
    both = prompts.qwen2_audio_spec(LabelRequest("cry", methods=("score", "generate")), "chat")
    gen = prompts.qwen2_audio_spec(LabelRequest("cry", methods=("generate",)), "chat")
    asr_base = prompts.qwen2_audio_spec(LabelRequest("asr"), "base")
    assert score.version == "q2a-chat-cry-score-v1"
    assert both.version == "q2a-chat-cry-both-v1"
    assert gen.version == "q2a-chat-cry-gen-v1"
    assert asr_base.version == "q2a-base-asr-v1"
    assert score.text == LabelRequest("cry").question


def test_custom_question_or_language_changes_the_version() -> None:
    custom = prompts.qwen2_audio_spec(LabelRequest("cry", question="Is an infant crying? yes/no"), "chat")
    assert custom.version.startswith("q2a-chat-cry-score-v1+") and custom.text.startswith("Is an infant")
    zh = prompts.qwen2_audio_spec(LabelRequest("asr", language="zh"), "base")
    assert zh.version.startswith("q2a-base-asr-v1+")
    assert zh.text == "Detect the language and recognize the speech: <|zh|>"
    assert prompts.qwen2_audio_spec(LabelRequest("asr", language="en"), "base").version == "q2a-base-asr-v1"


@pytest.mark.parametrize("bad", ["EN", "english", "en|><|x", ""])
def test_language_codes_are_validated(bad: str) -> None:
    with pytest.raises(ValueError, match="language"):
        prompts.qwen2_audio_spec(LabelRequest("asr", language=bad), "base")


def test_qwen2_base_prompt_puts_the_audio_first() -> None:
    spec = prompts.qwen2_audio_spec(LabelRequest("asr"), "base")
    assert prompts.qwen2_audio_base_prompt(spec) == (
        "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>"
    )


def test_qwen2_chat_messages_render_with_the_instruct_template() -> None:
    spec = prompts.qwen2_audio_spec(LabelRequest("cry"), "chat")
    rendered = (
        jinja2.Environment()
        .from_string(INSTRUCT_CHAT_TEMPLATE)
        .render(messages=prompts.qwen2_audio_messages(spec), add_generation_prompt=True)
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
        "Is there a baby crying in this audio? Answer yes or no.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen_audio_eval_script_prompts() -> None:
    asr = prompts.qwen_audio_spec(LabelRequest("asr", language="zh"), "base")
    assert prompts.qwen_audio_prompt(asr, "/data/a.wav") == (
        "<audio>/data/a.wav</audio><|startoftranscript|><|zh|><|transcribe|><|zh|><|notimestamps|><|wo_itn|>"
    )
    aqa = prompts.qwen_audio_spec(LabelRequest("cry", question="Is a baby crying {loudly}?"), "base")
    assert prompts.qwen_audio_prompt(aqa, "/x/b.flac") == (
        "<audio>/x/b.flac</audio><|startofanalysis|><|en|><|question|>Is a baby crying {loudly}?<|answer|>"
    )
    assert aqa.version.startswith("qa-eval-aqa-score-v1+")
    chat = prompts.qwen_audio_spec(LabelRequest("cry"), "chat")
    assert prompts.qwen_audio_prompt(chat, "/c.wav").startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1:<audio>/c.wav</audio>\n"
    )


def test_qwen_audio_rejects_paths_that_break_the_tag() -> None:
    spec = prompts.qwen_audio_spec(LabelRequest("asr"), "base")
    with pytest.raises(ValueError, match="contains"):
        prompts.qwen_audio_prompt(spec, "/x/</audio>evil.wav")


def test_strip_special_tags_like_the_eval_scripts() -> None:
    assert prompts.strip_special_tags("<|en|>hello   <|notimestamps|>world ") == "hello world"


def test_backend_and_style_detection_from_names() -> None:
    assert detect_backend("Qwen/Qwen2-Audio-7B-Instruct") == "qwen2-audio"
    assert detect_backend("Qwen/Qwen-Audio-Chat") == "qwen-audio"
    assert detect_prompt_style("Qwen/Qwen2-Audio-7B-Instruct") == "chat"
    assert detect_prompt_style("Qwen/Qwen2-Audio-7B") == "base"
