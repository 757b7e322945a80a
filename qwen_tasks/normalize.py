"""Compatibility path: `from qwen_tasks.normalize import normalize_yes_no` keeps working.

The answer normaliser lives in `qwen_tasks.labelling.answers` (answers are normalised when labels are
written); this module only re-exports it for code written against the old layout.
"""

from qwen_tasks.labelling.answers import CRY_VOCABULARY, YesNoVocabulary, clean_answer, normalize_yes_no

__all__ = ["CRY_VOCABULARY", "YesNoVocabulary", "clean_answer", "normalize_yes_no"]
