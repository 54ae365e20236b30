"""Each dataset loader on small records written here; malformed records name record and field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from editpeft import DatasetFormatError
from editpeft.evaluation import detect_format, load_cases, load_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

COUNTERFACT = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "{} is located in", "subject": "The Louvre",
                          "target_new": {"str": "Rome", "id": "Q1"}, "target_true": {"str": "Paris", "id": "Q2"}},
    "paraphrase_prompts": ["Some text. The Louvre sits in"],
    "neighborhood_prompts": ["The Eiffel Tower is located in", "Notre-Dame is located in"],
    "attribute_prompts": [], "generation_prompts": ["The Louvre is"],
    "portability": {"Recalled Relation": "(Rome, capital of, Italy)",
                    "New Question": "Which country is the Louvre in?", "New Answer": "Italy"},
    "alternative_subject": "Louvre Museum",
    "unrelated_relation": {"relation_id": "P31", "object": "museum", "question": "What is the Louvre?"},
    "distracting_neighborhood_prompts": ["The Louvre is located in Rome. The Eiffel Tower is located in"],
}
EASYEDIT = {"case_id": 3, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
            "target_new": "English", "ground_truth": "French",
            "rephrase_prompt": "Danielle Darrieux speaks", "locality_prompt": "Michel Rocard speaks",
            "locality_ground_truth": "French"}
ZSRE = {"subject": "Claire Clairmont", "src": "Who is Claire Clairmont's sister?", "alt": "Marian Clairmont",
        "answers": ["Mary Shelley"], "rephrase": "Who's Claire Clairmont's sister?",
        "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare",
        "portability": {"New Question": "Who is Marian's sister?", "New Answer": "Claire Clairmont"},
        "alter_subject_question": "Who is Clara Mary Jane Clairmont's sister?",
        "inverse question": "Who is Marian Clairmont's sister?"}
KNOWEDIT = {"subject": "Lac Otelnuk", "prompt": "The country Lac Otelnuk is in is", "target_new": "Peru",
            "ground_truth": [["Canada", "CA"]],
            "portability": {"Logical_Generalization": [
                {"prompt": "The currency of Lac Otelnuk is", "ground_truth": [["sol", "PEN"], ["nuevo sol"]]}]},
            "locality": {"Relation_Specificity": [{"prompt": "Lac Otelnuk is a", "ground_truth": "lake"}],
                         "Forgetfulness": [{"prompt": "Lac Otelnuk, not in Peru, is in", "ground_truth": ["Canada"]}]}}
MQUAKE = {"case_id": 11,
          "requested_rewrite": [{"prompt": "{} is a citizen of", "subject": "Ellie Kemper",
                                 "target_new": {"str": "Croatia"}, "target_true": {"str": "United States"},
                                 "question": "What is the country of citizenship of Ellie Kemper?"},
                                {"prompt": "The head of state of {} is", "subject": "Croatia",
                                 "target_new": {"str": "Kolinda"}, "target_true": {"str": "Zoran"}}],
          "questions": ["Who heads the country Ellie Kemper is a citizen of?"],
          "answer": "Joe Biden", "answer_alias": [], "new_answer": "Kolinda", "new_answer_alias": ["Kolinda G-K"]}


def test_counterfact_rome_format_with_survey_columns():
    (case,) = load_cases([COUNTERFACT])
    assert case.case_id == "7" and case.source == "counterfact"
    (req,) = case.requests
    assert req.prompt == "The Louvre is located in" and req.target_new == "Rome" and req.target_true == "Paris"
    assert [p.prompt for p in case.generalization] == COUNTERFACT["paraphrase_prompts"]
    assert case.generalization[0].answers == ("Rome",) and case.generalization[0].contrast == "Paris"
    neigh = case.locality["neighborhood"]
    assert len(neigh) == 2 and neigh[0].answers == ("Paris",) and neigh[0].contrast == "Rome"
    assert case.locality["distracting_neighborhood"][0].answers == ("Paris",)
    assert case.locality["other_attribution"][0].answers == ("museum",)
    assert case.portability["one_hop"][0].answers == ("Italy",)
    assert case.portability["subject_replace"][0].prompt == "Louvre Museum is located in"
    assert case.generation_prompts == ("The Louvre is",)
    assert detect_format([COUNTERFACT]) == "counterfact"


def test_counterfact_easyedit_format():
    (case,) = load_cases([EASYEDIT])
    assert detect_format([EASYEDIT]) == "counterfact_easyedit"
    assert case.requests[0].target_true == "French"
    assert case.generalization[0].prompt == "Danielle Darrieux speaks"
    assert case.locality["neighborhood"][0].answers == ("French",)


def test_zsre_mend_format_with_portability_columns():
    (case,) = load_cases([ZSRE])
    assert detect_format([ZSRE]) == "zsre"
    assert case.requests[0].target_new == "Marian Clairmont" and case.requests[0].target_true == "Mary Shelley"
    assert case.locality["nq"][0].answers == ("Shakespeare",)
    assert set(case.portability) == {"one_hop", "subject_replace", "inverse_relation"}
    assert case.portability["inverse_relation"][0].answers == ("Claire Clairmont",)
    assert case.portability["subject_replace"][0].answers == ("Marian Clairmont",)


def test_knowedit_answers_may_be_alias_lists():
    (case,) = load_cases([KNOWEDIT])
    assert detect_format([KNOWEDIT]) == "knowedit"
    assert case.requests[0].target_true == "Canada"
    assert case.portability["logical_generalization"][0].answers == ("sol", "PEN", "nuevo sol")
    assert case.locality["relation_specificity"][0].answers == ("lake",)
    assert case.locality["forgetfulness"][0].answers == ("Canada",)


def test_mquake_multi_hop():
    (case,) = load_cases([MQUAKE])
    assert detect_format([MQUAKE]) == "mquake"
    assert [r.prompt for r in case.requests] == ["Ellie Kemper is a citizen of", "The head of state of Croatia is"]
    assert case.generalization[0].answers == ("Croatia",)
    assert case.portability["multi_hop"][0].answers == ("Kolinda", "Kolinda G-K")


def test_round_trip_and_jsonl(tmp_path):
    path = tmp_path / "cf.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [COUNTERFACT, {**COUNTERFACT, "case_id": 8}]))
    cases = load_cases(path)
    assert [c.case_id for c in cases] == ["7", "8"]
    from editpeft.evaluation import EvalCase
    assert EvalCase.from_dict(json.loads(json.dumps(cases[0].to_dict()))) == cases[0]


@pytest.mark.parametrize("record, field", [
    ({**EASYEDIT, "target_new": 5}, "target_new"),
    ({**ZSRE, "answers": [1]}, "answers"),
    ({k: v for k, v in COUNTERFACT.items() if k != "paraphrase_prompts"} | {"paraphrase_prompts": "x"},
     "paraphrase_prompts"),
    ({**KNOWEDIT, "locality": {"Relation_Specificity": [{"ground_truth": "lake"}]}}, "locality.Relation_Specificity[0]"),
])
def test_malformed_record_names_record_and_field(record, field):
    good = {"counterfact_easyedit": EASYEDIT, "zsre": ZSRE, "counterfact": COUNTERFACT, "knowedit": KNOWEDIT}
    fmt = detect_format([record])
    with pytest.raises(DatasetFormatError) as e:
        load_cases([good[fmt], record], format=fmt)
    assert "record 1" in str(e.value) and field in str(e.value)


def test_missing_field_of_a_detected_format():
    broken = {k: v for k, v in COUNTERFACT.items()}
    broken["requested_rewrite"] = {k: v for k, v in COUNTERFACT["requested_rewrite"].items() if k != "subject"}
    with pytest.raises(DatasetFormatError, match=r"record 0: field 'requested_rewrite.subject' is missing"):
        load_cases([broken])


def test_unusable_record_is_skipped_or_strict():
    bad = {**ZSRE, "subject": "Someone Else"}
    ds = load_dataset([ZSRE, bad])
    assert len(ds.cases) == 1 and ds.skipped[0][0] == "1" and "does not occur" in ds.skipped[0][1]
    with pytest.raises(DatasetFormatError, match="record 1"):
        load_dataset([ZSRE, bad], strict=True)


def test_unknown_format_lists_expected_fields(tmp_path):
    with pytest.raises(DatasetFormatError) as e:
        load_cases([{"question": "q", "answer": "a"}])
    for name in ("counterfact", "counterfact_easyedit", "zsre", "knowedit", "mquake", "src, alt, answers"):
        assert name in str(e.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="not valid JSON"):
        load_cases(tmp_path / "bad.json")
    with pytest.raises(DatasetFormatError, match="twice"):
        load_cases([EASYEDIT, EASYEDIT])


@pytest.mark.parametrize("relpath, fmt", [
    ("counterfact/counterfact_rome_format_1129.json", "counterfact"),
    ("counterfact/easyedit_counterfact_val.json", "counterfact_easyedit"),
    ("portability/zsre_one_hop.json", "zsre"),
    ("knowedit/wiki_recent_train.json", "knowedit"),
    ("locality/counterfact_other_attribution.json", "counterfact"),
])
def test_shared_data_files(relpath, fmt):
    path = SHARED / relpath
    if not path.is_file():
        pytest.skip(f"{path} not present")
    ds = load_dataset(path)
    assert ds.format == fmt and len(ds.cases) > 100 and len(ds.skipped) < 0.02 * len(ds.cases)
