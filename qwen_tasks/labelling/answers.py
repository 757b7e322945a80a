"""Turn a model's free-form answer to a yes/no question into `yes`, `no` or `unknown`.

Why rules over clauses and not a lookup: models answer an unseen yes/no task verbosely ("There is a
baby, but it is not crying."), and exact match leaves most answers unlabelled while first-word or
substring matching is confidently wrong on negations. So the answer is cleaned, cut into sentences and
clauses, and each clause is read for (a) an explicit answer word (yes/no/是/没有...), (b) a mention of
the target event (crying, 哭...) with the negations that scope over it, (c) exclusive alternatives
("only a dog barking"), and (d) hedges. Clauses must agree: any contradiction, hedge about the target or
refusal gives `unknown`, because a wrong confident label is worse than an honest "don't know".

Before that, structured answers (JSON, XML-like tags, key-value lines, multiple-choice letters) are
read by their keys, and self-corrections ("Yes. Hmm, actually no.") by their last committed answer.

The target is configurable (`YesNoVocabulary`), so the same reader serves other yes/no questions.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import zhconv

Answer = Literal["yes", "no", "unknown"]


@dataclass(frozen=True)
class YesNoVocabulary:
    """Words that name the target event of a yes/no question, in English and Chinese.

    English terms are whole words (list every inflection you want matched); Chinese terms are matched
    as substrings of simplified text (traditional input is converted first). `weak_events` only count
    next to a subject term ("a siren wailing" is not a baby wailing). `contrary` states of the subject
    exclude the event ("the baby is laughing" answers "is a baby crying?" with no). Leave `subjects`
    empty when the event alone is the target (e.g. "Is there speech?").
    """

    events: tuple[str, ...]
    weak_events: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()
    other_subjects: tuple[str, ...] = ()
    zh_events: tuple[str, ...] = ()
    zh_weak_events: tuple[str, ...] = ()
    zh_subjects: tuple[str, ...] = ()
    zh_other_subjects: tuple[str, ...] = ()
    contrary: tuple[str, ...] = ()
    zh_contrary: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.events and not self.zh_events:
            raise ValueError("YesNoVocabulary needs at least one term in events or zh_events")
        for name in (
            "events",
            "weak_events",
            "subjects",
            "other_subjects",
            "zh_events",
            "zh_weak_events",
            "zh_subjects",
            "zh_other_subjects",
            "contrary",
            "zh_contrary",
        ):
            terms = getattr(self, name)
            if isinstance(terms, str):
                raise ValueError(f"YesNoVocabulary.{name} must be a tuple of terms, not one string")
            if any(not isinstance(t, str) or not t.strip() for t in terms):
                raise ValueError(f"YesNoVocabulary.{name} contains an empty or non-text term")


def _forms(*stems: str) -> tuple[str, ...]:
    """Regular English verb forms of each stem (wail -> wail, wails, wailed, wailing)."""
    out: list[str] = []
    for s in stems:
        out += [s, s + "s", s + "ed", s + "ing"]
    return tuple(out)


CRY_VOCABULARY = YesNoVocabulary(
    events=(
        "cry",
        "cries",
        "cried",
        "crying",
        "crys",
        "crier",
        "criers",
        "bawl",
        "bawls",
        "bawled",
        "bawling",
        "weep",
        "weeps",
        "wept",
        "weeping",
        "sob",
        "sobs",
        "sobbed",
        "sobbing",
        "teary",
        "in tears",
        "into tears",
    ),
    weak_events=_forms("wail", "whimper", "scream", "shriek", "squeal", "howl", "yowl", "fuss", "squall")
    + ("whine", "whines", "whined", "whining", "fussy", "fusses", "fussing", "fussed", "tantrum"),
    subjects=(
        "baby",
        "babies",
        "baby's",
        "infant",
        "infants",
        "infant's",
        "newborn",
        "newborns",
        "neonate",
        "neonates",
        "toddler",
        "toddlers",
        "child",
        "children",
        "child's",
        "kid",
        "kids",
        "bub",
        "little one",
        "babe",
    ),
    other_subjects=(
        "cat",
        "cats",
        "kitten",
        "kittens",
        "dog",
        "dogs",
        "puppy",
        "puppies",
        "bird",
        "birds",
        "seagull",
        "seagulls",
        "animal",
        "animals",
        "goat",
        "sheep",
        "man",
        "men",
        "woman",
        "women",
        "adult",
        "adults",
        "lady",
        "gentleman",
        "person",  # someone unspecified, or a girl/boy of any age: not necessarily a baby, so unknown
        "persons",
        "people",
        "someone",
        "somebody",
        "human",
        "humans",
        "girl",
        "girls",
        "boy",
        "boys",
        "teenager",
        "siren",
        "sirens",
        "wind",
    ),
    zh_events=("哭", "泣", "呜咽", "嚎啕", "号啕"),
    zh_weak_events=("啼", "嚎", "尖叫", "哼唧", "闹腾", "哭闹"),
    zh_subjects=("婴", "宝宝", "宝贝", "小孩", "孩子", "儿童", "幼儿", "娃", "小朋友", "新生儿", "幼童"),
    contrary=_forms("laugh", "giggle", "coo", "babble", "gurgle", "sleep", "chuckle", "smile", "play", "nap")
    + ("giggles", "giggling", "giggled", "babbles", "babbling", "babbled", "gurgles", "gurgling", "smiling")
    + ("asleep", "quiet", "calm", "silent", "happy", "content", "peaceful", "napping", "cooing", "laughter"),
    zh_contrary=("笑", "咿呀", "呀呀", "牙牙", "睡", "安静", "开心", "高兴", "玩", "平静"),
    zh_other_subjects=(
        "猫",
        "狗",
        "鸟",
        "动物",
        "大人",
        "成人",
        "成年",
        "女人",
        "男人",
        "妇女",
        "女性",
        "男性",
        "有人",
        "某人",
        "女孩",
        "男孩",
        "警笛",
    ),
)

# --- cleaning -----------------------------------------------------------------------------------------

_SPECIAL_TOKEN = re.compile(
    r"<\|im_start\|>\s*(?:system|user|assistant)?|<\|[^|>]*\|>|</?(?:s|unk|pad|eos|bos)>|\[(?:PAD|CLS|SEP|UNK)\]",
    re.I,
)
_HTML_TAG = re.compile(r"</?[a-zA-Z][^>]{0,40}>")
_QUOTES = dict.fromkeys(map(ord, '"“”„«»「」『』〝〞《》〈〉`*_#~|'), " ")
_APOSTROPHES = dict.fromkeys(map(ord, "‘’ʼ′`"), "'")
_CONTRACTIONS = (
    (re.compile(r"\bcan'?t\b"), "can not"),
    (re.compile(r"\bcannot\b"), "can not"),
    (re.compile(r"\bwon'?t\b"), "will not"),
    (re.compile(r"\bain'?t\b"), "is not"),
    (re.compile(r"\bshan'?t\b"), "shall not"),
    (
        re.compile(
            r"\b(is|are|was|were|do|does|did|has|have|had|could|would|should|must|might|need|dare)n'?t\b"
        ),
        r"\1 not",
    ),
    (re.compile(r"\b(there|it|that|what|here|he|she)'s\b"), r"\1 is"),
    (re.compile(r"\bi'm\b"), "i am"),
    (re.compile(r"\b(i|you|we|they)'re\b"), r"\1 are"),
    (re.compile(r"\b(i|you|we|they)'ve\b"), r"\1 have"),
    (re.compile(r"\b(i|you|we|they|he|she|it)'d\b"), r"\1 would"),
    (re.compile(r"\b(i|you|we|they|he|she|it)'ll\b"), r"\1 will"),
)


def clean_answer(text: str) -> str:
    """Lower-cased, half-width, simplified-Chinese text without special tokens, markdown or quotes."""
    text = (text or "").replace("\\n", "\n")  # a literal backslash-n from logged or JSON-escaped output
    text = _SPECIAL_TOKEN.sub(" ", text)
    text = _HTML_TAG.sub(" ", text)
    text = zhconv.convert(text, "zh-hans")  # before NFKC: it also rewrites CJK quotes to curly ones
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    text = text.lower().translate(_QUOTES)
    text = re.sub(r"(^|\s)'+|'+(\s|$|[,.!?;:])", r"\1 \2", text)  # quotes, not apostrophes in words
    text = re.sub(r"^\s*(?:[-+>]|\d+[.)])\s+", " ", text, flags=re.M)  # bullets, block quotes
    for pattern, repl in _CONTRACTIONS:
        text = pattern.sub(repl, text)
    text = re.sub(r"n't\b", " not", text)
    text = re.sub(r"[ \t\u3000]+", " ", text)
    return text.strip()


# --- lexicon ------------------------------------------------------------------------------------------


def _words(*words: str) -> str:
    return r"\b(?:" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")\b"


def _alt(*terms: str) -> str:
    return "(?:" + "|".join(sorted(map(re.escape, terms), key=len, reverse=True)) + ")"


# Stands for "the event asked about" where an answer refers to it without naming it ("no such sound").
_TARGET = "\ue000"

# Phrases that look negative but are not (or that must be read as something else), applied first.
_REWRITES_EN = (
    (r"\b(?:not only|not just|not merely|not simply|not solely)\b", " also "),
    (r"\b(?:no doubt|without (?:a |any )?doubt|no question|undoubtedly|unmistakabl[ey])\b", " surely "),
    (r"\bno wonder\b", " "),
    (r"\bnothing (?:else )?but\b", " only "),
    (r"\bnone other than\b", " "),
    (r"\bcan not help but\b", " "),
    (r"\bnot uncommon\b", " common "),
    (r"\b(?:rather than|instead of)\b", " not "),
    (
        r"\b(?:never|not|will not|would not|can not|could not|does not|did not|do not) (?:stop|stops|stopped"
        r"|cease|ceases|ceased|quit|quits)\b",
        " keeps ",
    ),
    (r"\b(no|not|never)(?:[\s,]+\1\b)+", r"\1"),  # "no, no baby crying" is one negation, not two
    (r"\byes(?: ?/ ?| or )no\b", " "),  # an echoed instruction ("answer yes or no")
    (r"\bno(?: ?/ ?| or )yes\b", " "),
    (r"\b(?:i|we) do not (?:think|believe) so\b", " no. "),
    (r"\b(?:i am )?afraid not\b", " no. "),
    (r"\b(?:i|we) (?:think|believe|guess) so\b", " yes. "),
    (r"\b(?:the|my) answer (?:is|would be|will be)\s*:?", " answer: "),
    (r"\b(?:i would|i will|i'd) (?:say|answer)\s*:?", " answer: "),
    (r"\s[-\u2013\u2014]+\s", ", "),  # dashes between clauses read as commas
    # indirect negation: "not that I can hear", "far from it", "can't make out any crying"
    (
        r"^(?:answer: )?(?:not that (?:i|we) (?:can|could) (?:hear|tell|detect|make out)|far from it)\b",
        " no. ",
    ),
    (
        r"\b(can not|could not|do not|did not|does not) (?:make out|pick up|discern|perceive)"
        r"(?= (?:any|anything|a single|even)\b)",
        r"\1 hear",
    ),
    # a phrase standing for the asked-about event ("nothing of the sort", "no such sound"): the target
    (r"^\(?[a-d] ?[).:\]] ?(?=(?:yes|no)\b)", " "),  # a multiple-choice letter before the answer: "(B) No"
    (r"\bnothing of (?:the|that) (?:sort|kind|nature)\b", "no " + _TARGET),
    (r"(?<=thing) (?:of (?:the|that) (?:sort|kind|nature)|like (?:that|this))\b", " " + _TARGET),
    (r"\b(?:such (?:a )?|(?:this|that) kind of )(?:thing|sound|noise)s?\b", _TARGET),
)
_REWRITES_ZH = (
    ("哦不", "不对"),
    ("这样的声音", _TARGET),
    ("这种声音", _TARGET),
    ("这回事", _TARGET),
    ("这种情况", _TARGET),
    ("这样的情况", _TARGET),
    ("不仅", "还"),
    ("不但", "还"),
    ("不只", "还"),
    ("不光", "还"),
    ("不止", "还"),
    ("只不过", "只"),
    ("不过", "但"),
    ("不停", "持续"),
    ("不断", "持续"),
    ("不住", "持续"),
    ("忍不住", "持续"),
    ("不少", "多"),
    ("不时", "时而"),
    ("不久", "随后"),
    ("非常", "很"),
    ("无疑", "确实"),
    ("毫无疑问", "确实"),
    ("没错", "对"),
    ("不错", "好"),
    ("差不多", "约"),
    ("无论", "不管"),
    ("不得不", "要"),
    ("不可能", "不会"),
    ("是或否", " "),
    ("是否", "吗"),
    ("有没有", "吗"),
    ("是不是", "吗"),
    ("我不这么认为", "没有。"),
    ("我不认为", "不"),
)

_NEG_EN = _words(
    "no",
    "not",
    "never",
    "none",
    "nobody",
    "nothing",
    "neither",
    "nor",
    "without",
    "absent",
    "absence",
    "lack",
    "lacks",
    "lacking",
    "lacked",
    "devoid",
    "nowhere",
    "unable",
    "zero",
    "free of",
    "missing",
)
_NEG_ZH = _alt("没有", "没", "不", "无", "未", "非", "否", "别", "毫无")
_AUX_EN = _words(
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "can",
    "could",
    "does",
    "do",
    "did",
    "has",
    "have",
    "had",
    "will",
    "would",
    "should",
    "may",
    "might",
    "must",
)
_FINITE_EN = _words(
    "is",
    "are",
    "was",
    "were",
    "can",
    "could",
    "does",
    "do",
    "did",
    "has",
    "have",
    "had",
    "will",
    "would",
    "hear",
    "hears",
    "heard",
    "detect",
    "detects",
    "detected",
    "sounds",
    "seems",
    "appears",
    "there",
)
_FINITE_ZH = _alt("有", "是", "在", "听到", "听见", "出现", "传来")
_ONLY_EN = _words("only", "just", "merely", "solely", "purely", "exclusively", "instead", "rather")
_ONLY_ZH = _alt(
    "只有", "只是", "只能", "只听到", "只听见", "仅有", "仅仅", "仅", "唯一", "而是", "全是", "都是"
)
_EXCEPT_EN = _words("except", "besides", "other than", "apart from", "aside from", "but", "save for")
_EXCEPT_ZH = _alt("除了", "以外", "之外")
_HEDGE_EN = re.compile(
    _words(
        "might",
        "may",
        "maybe",
        "perhaps",
        "possibly",
        "possible",
        "potentially",
        "whether",
        "if",
        "doubt",
        "unsure",
        "uncertain",
        "unclear",
        "ambiguous",
        "guess",
        "either",
        "resembles",
        "resemble",
        "resembling",
        "similar",
        "reminiscent",
        "mimics",
        "mimicking",
        "imitates",
        "imitating",
        "imitation",
    )
    + r"|\b(?:a bit|a little|sort of|kind of|somewhat|almost|vaguely) like\b"
    + r"|\bcould(?! (?:not |clearly |also )?(?:hear|be heard|detect|make out|notice|tell|identify))\b"
)
_HEDGE_ZH = re.compile(
    _alt(
        "可能",
        "也许",
        "或许",
        "说不定",
        "不一定",
        "疑似",
        "不确定",
        "类似",
        "模仿",
        "不清楚",
        "如果",
        "假如",
        "吗",
    )
)
# "a baby crying or a cat meowing": the target offered as one of alternatives is not an affirmation.
_ALTERNATIVE = re.compile(r"\bor\b|或者|或是")
_UNCERTAIN = re.compile(
    r"\b(?:not (?:sure|certain|clear|possible to (?:tell|say|know|determine))|unsure|uncertain|unclear"
    r"|inconclusive|ambiguous|hard to (?:tell|say|know|determine|discern|judge|hear|make out)"
    r"|difficult to (?:tell|say|know|determine|discern|judge|hear|make out)"
    r"|impossible to (?:tell|say|know|determine|discern|judge)"
    r"|(?:can|could|will|would|do|does|did) not (?:really )?(?:tell|determine|say|know|be sure|be certain"
    r"|confirm|identify|distinguish|decide|judge|make out|discern)"
    r"|unable to (?:tell|determine|say|know|confirm|identify|distinguish|decide|judge|make out|discern)"
    r"|no way to (?:tell|know|determine)|cannot be determined|yes and no|(?:yes|no) and (?:yes|no)"
    r"|hard to be sure|can go either way|either way|(?:i am|we are) (?:only |just |merely )?guessing)\b"
    r"|不确定|无法确定|无法判断|难以判断|难以确定|不能确定|不能判断|判断不了|不清楚|听不清|说不准|不好说|很难说"
    r"|不知道|无法识别|无法分辨|难以分辨|无法得知|无法区分|难以区分|分辨不出|不敢肯定|是也不是|有也没有"
)
_REFUSAL = re.compile(
    r"\b(?:as an ai|i am (?:just )?(?:an ai|a language model|a text)|language model|i am sorry|sorry"
    r"|(?:can not|unable to|not able to|do not have the ability to) (?:listen|play|process|access|open"
    r"|analy[sz]e)|(?:can not|unable to) hear (?:audio|the audio|sound|sounds|anything)\b"
    r"(?! ?(?:\ue000|like))"
    r"|no audio|not provided|i do not have (?:access|the ability))"
    r"|抱歉|对不起|作为(?:一个)?(?:ai|人工智能|语言模型)|无法(?:听|播放|处理|访问)"
)
_STOPPED = re.compile(r"\b(?:stopped|stops|ceased|no longer|finished)\b|不再|停止|止住|不\S?哭了")
_STOPPED_AFTER = re.compile(
    r"^\s*(?:\w+\s+){0,2}?(?:stopped|stops|ceased|ceases|ended|ends|died down|dies down)\b"
)
# A moment inside the clip: crying that stops "halfway through" or "after a few seconds" did occur,
# while "the baby has stopped crying" may describe the time before the recording (unknown).
_PARTWAY = re.compile(
    r"\b(?:half ?way|part ?way|mid ?way|in the middle|towards? the end|near the end|at the end|by the end"
    r"|at the (?:start|beginning)|at first|then|eventually|briefly|shortly"
    r"|after (?:a|an|one|a few|a couple of|several|some|\d+|two|three|four|five|ten) ?(?:seconds?|moments?"
    r"|minutes?|while|s)|(?:a|one|a few) (?:seconds?|moments?) later|seconds? in"
    r"|for (?:a|a few|a couple of|several|some|\d+|two|three|five|ten) ?(?:seconds?|moments?|while|s))\b"
    r"|一会儿?|一下|然后|后来|随后|中途|开头|开始时|最后|几秒|片刻|过了"
)
_WH_AFTER = re.compile(r"^\W*(?:what|which|where|who|how|when|why|exactly what|是什么|什么|哪|谁|为何)")
_INTERROGATIVE = re.compile(
    r"^(?:question:?\s*)?(?:is|are|does|do|did|was|were|can|could|will|would|has|have)\s+"
    r"(?:there|the|a|an|this|it|you|any|someone|somebody)\b"
)
_SURE = r"(?:definitely|certainly|absolutely|surely|clearly|obviously)"  # "Definitely yes."
_LEAD_YES = re.compile(
    r"^(?:answer:\s*)?(?:(?:" + _SURE + r"\s+)?(?:yes|yeah|yep|yup|yea|aye|yess+)\b"
    r"|(?:sure|correct|indeed|absolutely|definitely|certainly|affirmative|true|right|surely|of course"
    r"|that is right|that is correct|positive"
    r"|(?:there|it|that) (?:is|was|are|does|do)(?: indeed)?)\s*(?:[,.!;:]|$))"  # elliptical "There is."
)
_LEAD_NO = re.compile(
    r"^(?:answer:\s*)?(?:(?:(?:"
    + _SURE
    + r"\s+)?(?:no|nope|nah)|negative|false|incorrect|wrong|not really|not at all|none"
    r"|absolutely not|definitely not|certainly not|of course not|surely not|obviously not|clearly not"
    r"|not quite|probably not"
    r"|likely not|no way|(?:there|it|that) (?:is|was|are|does|do) not|there is none|there are none)"
    r"\s*(?:[,.!;:]|$)"
    r"|(?:no|nope|nah)\s+(?=(?:there|it|i|the|this|that|we|they|he|she|not|sir|madam|such|audio|sound)\b))"
)
_LEAD_YES_ZH = re.compile(
    r"^(?:答案[是为]?[:：]?\s*|answer:\s*)?(?:是的?|对的?|有的?|没错|确实有?|当然有?|肯定有?|是啊|对啊|有啊|是呀|有呀|是有|会|yes)"
    r"\s*(?:[,.!;:。，！、]|$)"
)
_LEAD_NO_ZH = re.compile(
    r"^(?:答案[是为]?[:：]?\s*|answer:\s*)?(?:不是的?|不对|否|没有的?|没|无|不|并没有|不会|没有啊|没有呢|并不是|no)"
    r"\s*(?:[,.!;:。，！、]|$)"
)
_ANSWER_WORD = re.compile(
    r"(?:^|\banswer:\s*|\b(?:so|thus|therefore|hence|then),?\s+)(yes|no)\s*(?:[,.!;]|$)"
    r"|答案[是为]?[:：]?\s*(是|否|有|没有|不是)"
)
_SENTENCE_SPLIT = re.compile(r"(?<=[!?。！？;；\n])|(?<=\.)(?=\s|$)")  # not inside "0.5"
_CONTRAST_EN = re.compile(
    r"\b(?:but|however|although|though|whereas|yet|instead|nevertheless|nonetheless|while|except that)\b"
)
_CONTRAST_ZH = re.compile(r"但是|但|可是|然而|却|而是|虽然|尽管|不过")


@dataclass(frozen=True)
class _Lexicon:
    event: re.Pattern[str]
    weak: re.Pattern[str] | None
    subject: re.Pattern[str] | None
    other: re.Pattern[str] | None
    contrary: re.Pattern[str] | None
    needs_subject: bool


def _term_pattern(en: tuple[str, ...], zh: tuple[str, ...]) -> re.Pattern[str] | None:
    parts = ([_words(*en)] if en else []) + ([_alt(*zh)] if zh else [])
    return re.compile("|".join(parts)) if parts else None


@lru_cache(maxsize=32)
def _lexicon(vocab: YesNoVocabulary) -> _Lexicon:
    event = _term_pattern(vocab.events, vocab.zh_events)
    if event is None:  # __post_init__ guarantees one of the two
        raise ValueError("vocabulary has no event terms")
    return _Lexicon(
        event=re.compile(event.pattern + "|" + _TARGET),
        weak=_term_pattern(vocab.weak_events, vocab.zh_weak_events),
        subject=_term_pattern(vocab.subjects, vocab.zh_subjects),
        other=_term_pattern(vocab.other_subjects, vocab.zh_other_subjects),
        contrary=_term_pattern(vocab.contrary, vocab.zh_contrary),
        needs_subject=bool(vocab.subjects or vocab.zh_subjects),
    )


# --- reading ------------------------------------------------------------------------------------------


@dataclass
class _Reading:
    """Evidence gathered from one answer."""

    yes: int = 0
    no: int = 0
    other: int = 0  # the event, but by a non-target subject ("a cat is crying")
    hedged: bool = False  # the target mentioned under a hedge ("it might be a baby crying")
    uncertain_global: bool = False  # "I can't tell", refusals
    content: int = 0  # clauses that carried target evidence


def _is_question(sentence: str) -> bool:
    s = sentence.strip()
    return s.endswith("?") or bool(_INTERROGATIVE.match(s)) or bool(re.search(r"[吗么][?]?$", s))


# An echoed instruction once its "yes or no" is gone: "Please answer with yes or no." / "请回答是或否。"
_INSTRUCTION = re.compile(
    r"^(?:please |kindly )?(?:answer|respond|reply)(?: (?:with|in|using|only|by))*(?: (?:a|one|the|single))*"
    r"(?: (?:word|format))?[\s:,]*$|^请?(?:用|以)?(?:回答|回复|作答)[\s:：,，]*$"
)


def _sentences(text: str) -> list[str]:
    """Sentences without final punctuation; questions and instructions (an echoed prompt) are dropped."""
    out: list[str] = []
    for raw in _SENTENCE_SPLIT.split(text):
        raw = raw.strip(" ,")
        if raw and not _is_question(raw) and not _INSTRUCTION.match(raw.rstrip(".!?。！？;； ")):
            out.append(raw.rstrip(".!?。！？;； "))
    return out


def _strip_header(sentence: str) -> str:
    """'Baby crying: no' -> 'no'; 'Answer: yes' -> 'answer: yes' (kept, answer words are read later)."""
    m = re.match(r"^([^:]{1,60}):\s*(.+)$", sentence)
    if not m:
        return sentence
    head, rest = m.group(1).strip(), m.group(2).strip()
    if head in ("answer", "答案", "a", "回答"):
        return "answer: " + rest
    if re.fullmatch(r"(?:yes|no|none|present|absent|detected|not detected|是|否|有|没有|无)", rest):
        return "answer: " + ("no" if rest in ("none", "absent", "not detected", "否", "没有", "无") else rest)
    if re.search(_NEG_EN, head) or re.search(_FINITE_EN, head) or re.search(_NEG_ZH, head):
        return sentence
    return rest  # a label in front of the content ("Detected sounds: a dog barking")


def _explicit(sentence: str, first: bool) -> tuple[int, str]:
    """Explicit answer word at the start of a sentence: (+1 yes / -1 no / 0, the rest of the sentence)."""
    s = sentence.strip()
    if first or s.startswith("answer:"):
        for pattern, sign in ((_LEAD_NO, -1), (_LEAD_YES, 1), (_LEAD_NO_ZH, -1), (_LEAD_YES_ZH, 1)):
            m = pattern.match(s)
            if m:
                return sign, s[m.end() :].strip(" ,.!;:。，！、")
    m = _ANSWER_WORD.search(s)
    if m:
        word = m.group(1) or m.group(2)
        return (1 if word in ("yes", "是", "有") else -1), (s[: m.start()] + " " + s[m.end() :]).strip()
    return 0, s


_REWRITES_ZH_RE = (
    (re.compile(r"哪(?:里|儿)?有(?:什么)?"), "没有"),  # rhetorical: 哪有什么哭声 = there is no crying
    (re.compile(r"是\s*(?:或|/|还是)\s*否|有\s*(?:或|/|还是)\s*没有"), " "),  # an echoed instruction
)


def _rewrite(text: str) -> str:
    for pattern, repl in _REWRITES_EN:
        text = re.sub(pattern, repl, text, flags=re.M)
    for old, new in _REWRITES_ZH:
        text = text.replace(old, new)
    for regex, new in _REWRITES_ZH_RE:
        text = regex.sub(new, text)
    return text


def _clauses(sentence: str) -> list[str]:
    pieces: list[str] = []
    for part in _CONTRAST_EN.split(sentence):
        pieces.extend(_CONTRAST_ZH.split(part))
    return [p.strip(" ,、，:") for p in pieces if p.strip(" ,、，:")]


def _segment(clause: str, pos: int) -> str:
    """The comma-delimited part of `clause` around position `pos`."""
    start = max((m.end() for m in re.finditer(r"[,，、]", clause[:pos])), default=0)
    stop = re.search(r"[,，、]", clause[pos:])
    return clause[start : pos + stop.start()] if stop else clause[start:]


def _subject_of(clause: str, pos: int, sentence: str, answer: str, lex: _Lexicon) -> str:
    """Who does the event at `pos`: 'target', 'other' or 'none' (no subject named anywhere)."""
    for scope in (_segment(clause, pos), clause, sentence, answer):
        has_target = bool(lex.subject and lex.subject.search(scope))
        has_other = bool(lex.other and lex.other.search(scope))
        if has_target:
            return "target"
        if has_other:
            return "other"
    return "none"


_BOUNDARY = re.compile(r"[,，、;:]|\b(?:and|or|nor|so|plus)\b|和|或|以及|也|还有|并且")
_CONJUNCTION = re.compile(r"^\s*(?:(?:and|or|nor|plus)\b|和|或|以及|也|还有|并且)")
_NP_START = re.compile(
    r"^\s*(?:a|an|the|this|that|these|those|some|one|my|his|her|its|their|there|it|i|we|you|he|she|they)\b"
)
_NEG_ANY = re.compile(_NEG_EN + "|" + _NEG_ZH)


def _own_negations(segment: str) -> int | None:
    """Negations inside one segment (parity matters: 'not true that there is no X' affirms X)."""
    negs = list(_NEG_ANY.finditer(segment))
    exceptions = list(re.finditer(_EXCEPT_EN + "|" + _EXCEPT_ZH, segment))
    if exceptions and (not negs or exceptions[-1].start() > negs[-1].start()):
        return 0  # "nothing except a baby crying", "no sound other than crying": the cue is affirmed
    if not negs:
        return None
    return len(negs)


def _negations_over(clause: str, pos: int, end: int, subject: bool = False) -> int | None:
    """How many negations scope over the cue at clause[pos:end]; None when the scope is ambiguous.

    Scope is the cue's own segment (cut at commas and conjunctions). A segment without its own negation
    inherits one from the segment before only when it continues a list ("no laughing, crying or
    screaming"); a new finite clause ("..., a baby is crying") stops it; an article after a denied
    noun phrase ("no dog barking, a baby crying") is ambiguous, and ambiguity is reported, not guessed.
    """
    before = clause[:pos]
    barrier = max((m.end() for m in re.finditer(_ONLY_EN + "|" + _ONLY_ZH, before)), default=0)
    scope = before[barrier:]
    cuts = [0] + [m.start() for m in _BOUNDARY.finditer(scope)] + [len(scope)]
    segments = [scope[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if scope[a:b].strip(" ,，、;:")]
    after = clause[end:]
    cut = _BOUNDARY.search(after) or re.search(r"\b(?:but|while|only|just)\b", after)
    after = after[: cut.start()] if cut else after
    post = 0
    if (not subject and re.search(_AUX_EN + r"\s+(?:\w+\s+)?(?:not|never)\b", after)) or re.search(
        r"\b(?:absent|missing|none|nowhere|not (?:present|detected|heard|audible))\b", after
    ):
        post = 1
    if (not subject and re.search(r"^\s*(?:没有|没|不|无|未)", after)) or re.search(
        r"(?:没有|没|不|无|未)(?:听到|出现|检测到)", after
    ):
        post = 1
    if not segments:
        return post
    own = _own_negations(segments[-1] + clause[pos:end])
    if own is not None:
        return own + post
    # no negation of its own: inherit from the previous segment only for list continuations
    for i in range(len(segments) - 1, 0, -1):
        comma = segments[i].lstrip(" ").startswith((",", "，"))
        seg = segments[i].lstrip(" ,，、;:")
        if re.search(_FINITE_EN, seg) or re.search(_FINITE_ZH, seg):
            return post
        prev_own = _own_negations(segments[i - 1])
        conj = _CONJUNCTION.match(seg)
        rest = seg[conj.end() :] if conj else seg
        if re.search(
            r"[\u4e00-\u9fff]", seg
        ):  # Chinese: 、 and conjunctions continue a list, a comma is unclear
            continues = bool(conj) or not comma
        elif _NP_START.match(rest):  # "..., a baby crying" / "and a baby crying" may start a new statement
            continues = bool(conj) and conj.group(0).strip() in ("or", "nor")
        else:
            continues = True
        if prev_own is not None:
            if prev_own == 0:
                return post
            if not continues:
                return None
            return prev_own + post
        if not continues:
            return post
    return post


def _read_clause(clause: str, sentence: str, answer: str, lex: _Lexicon, reading: _Reading) -> None:
    strong = list(lex.event.finditer(clause))
    weak = list(lex.weak.finditer(clause)) if lex.weak else []
    subject_here = bool(lex.subject and lex.subject.search(clause))
    cues = strong + [m for m in weak if subject_here or not lex.needs_subject]
    hedged = bool(_HEDGE_EN.search(clause) or _HEDGE_ZH.search(clause))
    only = bool(re.search(_ONLY_EN, clause) or re.search(_ONLY_ZH, clause))
    last = max(m.end() for m in cues) if cues else 0
    if cues and (_STOPPED.search(clause[: last + 1]) or _STOPPED_AFTER.match(clause[last:])):
        if hedged or not (_PARTWAY.search(clause) or _PARTWAY.search(sentence)):
            reading.hedged = True  # "stopped crying" / "不哭了": did it cry in this audio or not?
            return
        # "the baby stops crying halfway through": it cried in the clip
        who = _subject_of(clause, cues[0].start(), sentence, answer, lex) if lex.needs_subject else "target"
        if who == "other":
            reading.other += 1
        else:
            reading.yes += 1
            reading.content += 1
        return
    if cues:
        signs = set()
        for m in cues:
            who = _subject_of(clause, m.start(), sentence, answer, lex) if lex.needs_subject else "target"
            count = _negations_over(clause, m.start(), m.end())
            if count is None:
                reading.hedged = True  # the negation's scope is ambiguous: do not guess
                continue
            negated = count % 2 == 1
            if who == "other" and not negated:
                reading.other += 1
                continue
            signs.add(-1 if negated else 1)
        if not signs:  # only someone else's event ("an adult is crying"): read the rest of the clause
            _read_without_event(clause, sentence, answer, lex, reading, hedged, subject_here, only)
            return
        if hedged or (signs == {1} and _ALTERNATIVE.search(clause)):
            reading.hedged = True
            return
        reading.content += 1
        if signs == {1}:
            reading.yes += 1
        elif signs == {-1}:
            reading.no += 1
        else:
            reading.hedged = True  # the same clause both affirms and denies: do not guess
        return
    _read_without_event(clause, sentence, answer, lex, reading, hedged, subject_here, only)


def _read_without_event(
    clause: str,
    sentence: str,
    answer: str,
    lex: _Lexicon,
    reading: _Reading,
    hedged: bool,
    subject_here: bool,
    only: bool,
) -> None:
    """A clause that does not mention the target event: a denied subject, a contrary state, or 'only X'."""
    if lex.subject and subject_here:
        # "There is no baby" denies the event; "there is a baby" alone says nothing about it.
        m = lex.subject.search(clause)
        count = _negations_over(clause, m.start(), m.end(), subject=True) if m else None
        if count is not None and count % 2 == 1 and not hedged:
            reading.no += 1
            reading.content += 1
            return
    if lex.contrary and not hedged:
        # "The baby is laughing" / "it is sleeping": the target subject in a state that excludes the event
        for m in lex.contrary.finditer(clause):
            if _subject_of(clause, m.start(), sentence, answer, lex) != "target":
                continue
            if _negations_over(clause, m.start(), m.end()) == 0:
                reading.no += 1
                reading.content += 1
                return
    if subject_here:
        return
    if only and not hedged and not re.search(_NEG_EN + "|" + _NEG_ZH, clause):
        # "only a dog barking": an exclusive description that leaves no room for the target
        reading.no += 1
        reading.content += 1


def _read(cleaned: str, lex: _Lexicon, context: str | None = None) -> _Reading:
    """Evidence in an answer that went through clean_answer and _rewrite; `context` (default: the
    answer itself) is where a subject is looked up when no nearer one is named."""
    reading = _Reading()
    if _REFUSAL.search(cleaned):
        reading.uncertain_global = True
    sentences = [_strip_header(s) for s in _sentences(cleaned)]
    answer = context if context is not None else " ".join(sentences)
    for i, sentence in enumerate(sentences):
        for m in _UNCERTAIN.finditer(sentence):
            # "I'm not sure what the other sound is" is about something else; a clause naming the
            # target, or a bare "I can't tell", is about the question.
            own = _clauses(sentence[m.start() :])[0] if _clauses(sentence[m.start() :]) else ""
            about_target = bool(
                lex.event.search(own) or (lex.subject and lex.subject.search(own))
            ) or not _WH_AFTER.search(sentence[m.end() :])
            if about_target:
                reading.uncertain_global = True
        sign, rest = _explicit(sentence, first=(i == 0))
        if sign > 0:
            reading.yes += 1
        elif sign < 0:
            reading.no += 1
        # a second explicit word inside the rest ("Yes. No.", "yes, no") is caught as its own sentence
        if rest:
            sign2, rest2 = _explicit(rest, first=False)
            if sign2:
                reading.yes += sign2 > 0
                reading.no += sign2 < 0
                rest = rest2
        for clause in _clauses(rest):
            _read_clause(clause, sentence, answer, lex, reading)
    return reading


def _decide(reading: _Reading) -> Answer:
    """The answer one reading supports."""
    if reading.uncertain_global or reading.hedged:
        return "unknown"
    if reading.yes and reading.no:
        return "unknown"
    if reading.yes and reading.other and not reading.content:
        return "unknown"  # "Yes, a cat is crying": the yes is not about the target
    if reading.yes:
        return "yes"
    if reading.no:
        return "no"
    return "unknown"


def _status(reading: _Reading) -> str:
    """_decide, with its unknowns told apart: 'hedge' (doubt), 'other' (someone else does it), 'mixed'
    (contradiction) or 'none' (nothing about the question)."""
    decided = _decide(reading)
    if decided != "unknown":
        return decided
    if reading.uncertain_global or reading.hedged:
        return "hedge"
    if reading.yes and reading.no:
        return "mixed"
    return "other" if reading.other else "none"


# --- self-corrections ---------------------------------------------------------------------------------

# Where an answer corrects itself. A bare "no"/"不对" right before "wait" is itself the corrected answer,
# so the text is cut before it (zero width) and it starts the next part.
_CORRECTION = re.compile(
    r"(?:\b(?:hmm+|um+|uh+|oh|well)\b[\s,.!]*)*\b(?:actually|wait|hold on|on second thought|on reflection"
    r"|correction|i mean|scratch that|i take (?:that|it) back|i stand corrected"
    r"|let me correct (?:myself|that)"
    r"|listening again|on closer listening|on a second listen)\b"
    r"|(?=\b(?:no|nope|yes)\b[\s,.!]*(?:wait|hold on|actually|i mean)\b)"
    r"|(?=不对)|等等|等一下|其实|更正|我是说|纠正一下|说错了|我听错了|再听一下"
)


def _corrected(cleaned: str, lex: _Lexicon) -> Answer | None:
    """The last committed answer of a self-correcting reply; None when the reply does not correct itself.

    "Yes. Hmm, actually no." -> no; "No, wait, yes, a baby is crying." -> yes. An answer that flips more
    than once, or that ends in doubt or in someone else doing it ("Yes. Actually, I'm not sure." /
    "...actually it's an adult crying"), is unknown.
    """
    parts = [p.strip(" ,.;:!?、，。…") for p in _CORRECTION.split(cleaned)]
    statuses = [_status(_read(p, lex, context=cleaned)) for p in parts if p]
    if len(parts) < 2 or "mixed" in statuses:
        return None
    decided = [s for s in statuses if s in ("yes", "no")]
    if not decided:
        return None
    if sum(a != b for a, b in zip(decided, decided[1:], strict=False)) > 1:
        return "unknown"
    last = max(i for i, s in enumerate(statuses) if s in ("yes", "no"))
    if {"hedge", "other"} & set(statuses[last + 1 :]):
        return "unknown"
    return decided[-1]  # type: ignore[return-value]


# --- structured answers -------------------------------------------------------------------------------

_ANSWER_KEYS = re.compile(
    r"^(?:final )?(?:answer|label|result|prediction|predicted|response|output|decision|verdict|choice"
    r"|classification|class|value|detected|present)$|^(?:答案|结果|回答|判断|结论|标签)$"
)
_VALUE_ANSWER = {
    "yes": "yes",
    "true": "yes",
    "present": "yes",
    "detected": "yes",
    "positive": "yes",
    "y": "yes",
    "是": "yes",
    "有": "yes",
    "存在": "yes",
    "no": "no",
    "false": "no",
    "absent": "no",
    "not detected": "no",
    "not present": "no",
    "none": "no",
    "negative": "no",
    "n": "no",
    "否": "no",
    "无": "no",
    "没有": "no",
    "不是": "no",
    "不存在": "no",
}
_KEY_VALUE = re.compile(
    r"([^\s:=;,{}<>()\[\]\n，；。][^:=;,{}<>\n，；。：]{0,50}?)\s*[:=：]\s*"
    r"(yes|no|true|false|present|absent|detected|not detected|not present|none|是|否|有|无|没有|不是)"
    r"\s*(?=[,;，；。.\n]|$)"
)
_TAG_PAIR = re.compile(r"<([a-z][\w\-]{0,40})>\s*([^<]{0,200}?)\s*</\1\s*>")
_JSON_OBJECT = re.compile(r"\{.*\}", re.S)
_OPTION = re.compile(
    r"(?:^|(?<=[\s(\[:,;：，；]))\(?([a-d])\s*[).:\]]\s*(yes|no|是|否)\b|\b([a-d])\s*\(\s*(yes|no|是|否)\s*\)"
)
_CHOICE = re.compile(
    r"(?:\b(?:answer|choice|option)\b(?: is)?|\b(?:i(?: would|'d| will)? )?(?:pick|choose|go with|select)\b"
    r"|答案(?:是|为)?|选择?|->|=>|→)\s*[:：]?\s*\(?([a-d])\)?"
    r"(?=\s*(?:[).,;!(（。，；！]|$))"
)


def _key_kind(key: str, lex: _Lexicon) -> str:
    """'answer' (the answer itself), 'target' (names the asked-about event), 'other' or 'note'."""
    words = re.sub(r"[_\-.]+", " ", key).strip().lower()
    words = re.sub(r"([a-z])([A-Z])", r"\1 \2", words)
    if _ANSWER_KEYS.match(words):
        return "answer"
    if lex.event.search(words) or (lex.weak and lex.weak.search(words)):
        if lex.other and lex.other.search(words) and not (lex.subject and lex.subject.search(words)):
            return "other"
        return "target"
    return "other" if lex.other and lex.other.search(words) else "note"


def _value_answer(value: Any) -> Answer | None:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return _VALUE_ANSWER.get(value.strip().strip(".!").lower())  # type: ignore[return-value]
    return None


def _from_fields(fields: list[tuple[str, Any]], lex: _Lexicon) -> Answer | None:
    """Answer from (key, value) fields; None when no field answers the question."""
    answers: set[str] = set()
    notes: list[str] = []
    for key, value in fields:
        kind = _key_kind(str(key), lex)
        answer = _value_answer(value)
        words = re.sub(r"[_\-.]+", " ", str(key)).strip().lower()
        negated = bool(re.search(r"^(?:no|not|non|without|absence of)\b|^(?:没有|无|不)", words))
        if kind in ("answer", "target") and answer is not None:
            answers.add({"yes": "no", "no": "yes"}[answer] if negated and kind == "target" else answer)
        elif kind == "note" and isinstance(value, str) and len(value.split()) > 2:
            notes.append(value)
    if not answers:
        return None
    if len(answers) > 1:
        return "unknown"
    (answer,) = answers
    # an explanation that says the opposite makes the field untrustworthy
    if any(_answer(note, lex, structured=False) not in (answer, "unknown") for note in notes):
        return "unknown"
    return answer  # type: ignore[return-value]


def _json_fields(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, dict | list):
                out += _json_fields(value, f"{prefix}{key} ")
            else:
                out.append((f"{prefix}{key}", value))
    elif isinstance(obj, list):
        for value in obj:
            out += _json_fields(value, prefix)
    return out


def _structured(text: str, lex: _Lexicon) -> Answer | None:
    """JSON, XML-like tags, key-value lines and multiple-choice letters; None when the answer is prose."""
    raw = unicodedata.normalize("NFKC", text)
    found = _JSON_OBJECT.search(raw)
    if found:
        try:
            obj = json.loads(found.group(0))
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            return _from_fields(_json_fields(obj), lex) or "unknown"
    lowered = raw.lower()
    tags = _TAG_PAIR.findall(lowered)
    if tags:
        answer = _from_fields(tags, lex)
        if answer is not None:
            return answer
    # key-value lines count only when they are the whole answer ("speech: no, baby crying: yes"), so
    # "Answer: yes, but a cat is crying" is still read as prose
    pairs = list(_KEY_VALUE.finditer(lowered))
    if pairs and not re.sub(r"[\s,;，；。.`]", "", _KEY_VALUE.sub("", lowered)):
        fields = [(m.group(1), m.group(2)) for m in pairs]
        answer = _from_fields(fields, lex)
        if answer is None and all(_key_kind(k, lex) == "other" for k, _ in fields):
            return "unknown"  # "Dog barking: yes" says nothing about a baby crying
        if answer is not None:
            return answer
    options = {
        m.group(1) or m.group(3): _VALUE_ANSWER[m.group(2) or m.group(4)] for m in _OPTION.finditer(lowered)
    }
    if options:
        choices = {m.group(1) for m in _CHOICE.finditer(lowered)} & options.keys()
        if len(choices) == 1:
            return options[choices.pop()]  # type: ignore[return-value]
        if len(set(options.values())) > 1:
            return "unknown"  # the options echoed back with no choice made
    return None


# --- the answer ---------------------------------------------------------------------------------------


def _answer(text: str, lex: _Lexicon, structured: bool = True) -> Answer:
    if structured:
        answer = _structured(text, lex)
        if answer is not None:
            return answer
    cleaned = _rewrite(clean_answer(text))
    corrected = _corrected(cleaned, lex)
    if corrected is not None:
        return corrected
    return _decide(_read(cleaned, lex))


def normalize_yes_no(text: str, vocabulary: YesNoVocabulary | None = None) -> Answer:
    """Read a free-form answer to a yes/no question (default: "is there a baby crying?").

    Returns "unknown" for empty answers, refusals, hedges about the target, and whenever the answer's
    parts disagree (an explicit "yes" next to "a cat is crying", or "yes and no"). A self-correction
    counts its last committed answer ("Yes. Hmm, actually no." -> no) unless it flips more than once.
    """
    if text is None or not str(text).strip():
        return "unknown"
    return _answer(str(text), _lexicon(vocabulary or CRY_VOCABULARY))
